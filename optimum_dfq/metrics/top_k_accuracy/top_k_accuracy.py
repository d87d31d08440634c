"""Top-k accuracy as an `evaluate` metric module, shipped with optimum_dfq so it loads offline."""

import datasets
import evaluate

_DESCRIPTION = "Top-k accuracy: the fraction of examples whose reference label is among the k highest-scored classes."
_KWARGS = """
Args:
    predictions (`list[list[int]]`): for each example, class ids sorted by decreasing score (at least max(k) of them).
    references (`list[int]`): the true class ids.
    k (`list[int]`, defaults to [1, 5]): which accuracies to report.
Returns:
    `dict`: `{"top1": float, "top5": float, ...}`.
"""


class TopKAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("int64")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, k=(1, 5)):
        total = len(references)
        results = {}
        for top in k:
            hits = sum(int(ref in pred[:top]) for pred, ref in zip(predictions, references))
            results[f"top{top}"] = hits / total if total else float("nan")
        return results
