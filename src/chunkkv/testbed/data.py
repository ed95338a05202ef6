"""Training batches for the testbed model, drawn from the synthetic suite's distribution.

A training sequence is ``<s> context question answer </s>``, exactly what the model sees at
evaluation time, except that the episodes are *denser* (more needles and queries per sequence,
shorter haystacks) so that almost every sequence carries many retrieval targets. The loss is
taken only on the answer tokens (the only predictable ones). Where the answer order is free
(the next item of a multi-query / multi-value / variable-tracking list) every correct next word
is a target: the loss is ``-log sum_{w in choices} p(w)``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from chunkkv.synthetic import SYLLABLES, Episode, build_episode
from chunkkv.testbed.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, build_tokenizer

__all__ = ["Batch", "EpisodeEncoder", "TrainingMixture", "choice_loss", "make_batch"]


class EpisodeEncoder:
    """Maps episode words to testbed token ids (word-level: one id per word)."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = build_tokenizer().get_vocab()
        # Syllables come last in the vocabulary (see vocabulary_words()).
        self.first_syllable_id = self.vocab[SYLLABLES[0]]
        assert all(self.vocab[s] >= self.first_syllable_id for s in SYLLABLES)

    def ids(self, words: list[str]) -> list[int]:
        v = self.vocab
        return [v.get(w, UNK_ID) for w in words]

    def encode(
        self, ep: Episode, lm_loss: bool = True
    ) -> tuple[list[int], list[tuple[int, list[int], bool]]]:
        """Token ids of the whole sequence and ``(position, target ids, is_answer)`` loss terms.

        ``position`` is the index of the token whose logits predict the target. With
        ``lm_loss`` the prompt tokens are targets too, except the first occurrence of every
        key/value syllable (random, hence unpredictable). Predicting the filler's sentence
        structure rewards previous-token attention heads early, which is half of the induction
        circuit the answers need; repeated syllables (second key syllables in questions,
        variables on the right of an assignment) are induction targets already in the prompt.
        """
        prompt = [BOS_ID] + self.ids(ep.context_words) + self.ids(ep.question_words)
        answer = self.ids(ep.answer_words) + [EOS_ID]
        ids = prompt + answer
        targets: list[tuple[int, list[int], bool]] = []
        if lm_loss:
            seen: set[int] = set()
            for i in range(1, len(prompt)):
                tok = prompt[i]
                if tok >= self.first_syllable_id:
                    if tok not in seen:
                        seen.add(tok)
                        continue
                targets.append((i - 1, [tok], False))
        for i, tok in enumerate(answer):
            pos = len(prompt) + i - 1
            if i in ep.choices:
                targets.append((pos, self.ids(ep.choices[i]), True))
            else:
                targets.append((pos, [tok], True))
        return ids, targets


@dataclass
class Batch:
    """Padded input ids plus the loss terms in gather form."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    rows: torch.Tensor  # [N] batch index of each loss term
    cols: torch.Tensor  # [N] position of each loss term
    targets: torch.Tensor  # [N, K] target ids, padded with -1
    is_answer: torch.Tensor  # [N] bool, the term belongs to the answer
    n_tokens: int


@dataclass
class TrainingMixture:
    """Which tasks, with which sizes, training draws from (denser than the evaluation defaults)."""

    weights: tuple[tuple[str, float], ...] = (
        ("niah_single", 0.10),
        ("niah_multikey", 0.20),
        ("niah_multivalue", 0.20),
        ("niah_multiquery", 0.30),
        ("vt", 0.20),
    )

    def draw(self, rng: random.Random, length: int, max_items: int) -> Episode:
        tasks = [t for t, _ in self.weights]
        task = rng.choices(tasks, [w for _, w in self.weights])[0]
        hay = rng.choice(("varied", "repetitive"))
        depth = rng.uniform(0, 100) if rng.random() < 0.3 else None
        # Item counts grow with the budget so short sequences are mostly needles, not filler.
        m = max(2, max_items)
        if task == "niah_single":
            opts = {}
        elif task == "niah_multikey":
            opts = {"num_keys": rng.randint(2, m)}
        elif task == "niah_multivalue":
            opts = {"num_values": rng.randint(2, min(m, 6))}
        elif task == "niah_multiquery":
            opts = {"num_queries": rng.randint(2, m)}
        else:
            opts = {"num_hops": rng.randint(1, min(m, 6)), "num_chains": rng.randint(1, 2)}
        return build_episode(task, rng, length, None, depth=depth, haystack=hay, **opts)


def make_batch(
    rng: random.Random,
    encoder: EpisodeEncoder,
    mixture: TrainingMixture,
    batch_size: int,
    length_range: tuple[int, int],
    max_items: int,
    lm_loss: bool = True,
) -> Batch:
    """``batch_size`` episodes with prompt lengths drawn uniformly from ``length_range``."""
    seqs, terms = [], []
    for _ in range(batch_size):
        ep = mixture.draw(rng, rng.randint(*length_range), max_items)
        ids, targets = encoder.encode(ep, lm_loss)
        seqs.append(ids)
        terms.append(targets)
    T = max(len(s) for s in seqs)
    input_ids = torch.full((batch_size, T), PAD_ID, dtype=torch.long)
    mask = torch.zeros((batch_size, T), dtype=torch.long)
    rows, cols, tg, ans = [], [], [], []
    for b, (s, ts) in enumerate(zip(seqs, terms)):
        input_ids[b, : len(s)] = torch.tensor(s)
        mask[b, : len(s)] = 1
        for pos, ids, is_ans in ts:
            rows.append(b)
            cols.append(pos)
            tg.append(ids)
            ans.append(is_ans)
    K = max(len(t) for t in tg)
    targets = torch.full((len(tg), K), -1, dtype=torch.long)
    for i, t in enumerate(tg):
        targets[i, : len(t)] = torch.tensor(t)
    return Batch(input_ids, mask, torch.tensor(rows), torch.tensor(cols), targets, torch.tensor(ans), int(mask.sum()))


def choice_loss(logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``-log sum_{valid} p`` over the loss terms, and per-term correctness of the argmax."""
    sel = logits[batch.rows, batch.cols].float()  # [N, V]
    valid = batch.targets >= 0
    gathered = sel.gather(1, batch.targets.clamp(min=0))
    gathered = gathered.masked_fill(~valid, float("-inf"))
    loss = (torch.logsumexp(sel, -1) - torch.logsumexp(gathered, -1)).mean()
    pred = sel.argmax(-1, keepdim=True)
    correct = ((batch.targets == pred) & valid).any(-1)
    return loss, correct
