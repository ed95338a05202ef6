"""Which layers should score the single page set a request keeps in the engine (development set).

The engine keeps one page set for every layer, so the window scores of several layers must be
combined. On 10 development prompts (SmolLM2-135M-Instruct, ~2,048 tokens, the study's facts rotated
so none is asked where the capacity and quality sets ask it), this measures the share of the fact's
tokens whose page is kept at 20 % and 10 % (pages of 32 tokens, window 32) for several ways of
combining the layers' window scores. It chose ``score_from=0.5`` (the deeper half).

Writes ``studies/serving/results/score_layers.md``. About 3 minutes (two torch threads).

    python -m studies.serving.score_layers
"""

from __future__ import annotations

from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
from . import capacity as sc

OUT = HERE / "results"


def layer_scores(model, ids: list[int], window: int) -> torch.Tensor:
    """``[layers, Hkv, T]`` window attention scores of one prompt."""
    from chunkkv.scoring import window_attention_scores
    from chunkkv.serving.attention import install_tap, tag_model, untag_model

    per_layer = []

    def observe(module, query, key, kwargs):
        per_layer.append(window_attention_scores(query[:, :, -window:], key, module.scaling)[0])

    install_tap()
    tag_model(model, observe)
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]))
    finally:
        untag_model(model)
    return torch.stack(per_layer)


def main() -> None:
    torch.set_num_threads(2)
    import chunkkv
    from chunkkv.budget import Budget
    from chunkkv.serving.pages import plan_pages, select_pages

    model, tokenizer = chunkkv.load_pretrained("smollm2", device="cpu")
    sc.FACTS = sc.FACTS[4:] + sc.FACTS[:4]  # development facts: not where the evaluation sets ask them
    requests = sc.build_requests(tokenizer, 10, 2048)
    samples = []
    for request in requests:
        ids = request["ids"]
        fact = next(f for f, _, a in sc.FACTS if a == request["answer"])
        fact_ids = tokenizer(" " + fact)["input_ids"]
        start = next(j for j in range(len(ids)) if ids[j : j + 4] == fact_ids[1:5])
        samples.append((layer_scores(model, ids, 32), start, start + len(fact_ids) - 1, len(ids)))
    n_layers = samples[0][0].shape[0]

    def combos(scores: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {"every layer (sum)": scores.sum(0), "layer 0 only (full index reuse)": scores[0]}
        for first in (n_layers // 3, n_layers // 2, 2 * n_layers // 3, 4 * n_layers // 5):
            out[f"layers {first}..{n_layers - 1} (sum)"] = scores[first:].sum(0)
        prefix = scores[..., 1:-32].amax(-1, keepdim=True).clamp(min=1e-9)
        out["every layer, each over its max (sink excluded)"] = (scores / prefix).sum(0)
        return out

    lines = ["# Which layers score the page set (development set)", "",
             "SmolLM2-135M-Instruct, 10 prompts of ~2,048 tokens (development facts), pages of 32 tokens, window 32. "
             "Coverage: share of the fact's tokens on kept pages; whole: prompts whose whole fact is kept.", "",
             "| layers combined | coverage at 20 % | whole at 20 % | coverage at 10 % | whole at 10 % |",
             "|---|---|---|---|---|"]
    names = list(combos(samples[0][0]))
    table = {name: [] for name in names}
    for fraction in (0.2, 0.1):
        for name in names:
            covered = []
            for scores, first, last, n_tokens in samples:
                plan = plan_pages(n_tokens, 32, Budget(keep_fraction=fraction), 32)
                pages = set(select_pages(combos(scores)[name], plan).tolist())
                covered.append(sum((t // 32) in pages for t in range(first, last + 1)) / (last - first + 1))
            table[name] += [sum(covered) / len(covered), sum(c == 1 for c in covered)]
    for name in names:
        c20, w20, c10, w10 = table[name]
        lines.append(f"| {name} | {c20:.2f} | {w20}/10 | {c10:.2f} | {w10}/10 |")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "score_layers.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
