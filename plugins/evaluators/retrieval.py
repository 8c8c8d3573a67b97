"""Image-text retrieval Recall@K (image-to-text and text-to-image), as reported for Flickr30K and MSCOCO by
CLIP (Radford et al. 2021, section 3.1.6) and ALIGN (Jia et al. 2021), on the run's own paired split.

Every image of the split is a query against all captions of the split and every caption against all
images, by cosine similarity of the L2-normalised embeddings. A query's only positive is its own pair
(sample i's image and sample i's caption): with captions made from class labels (MNIST), another
sample's identical caption is a different candidate and does not count as correct. Identical
candidates score exactly alike, so Recall@K is the expectation over uniformly random tie-breaking:
``min(1, max(0, K - g) / (t + 1))`` with ``g`` candidates scoring strictly above the positive and
``t`` others tying with it (exactly 0 or 1 without ties).
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from orchestrator.engine.evaluation import EvalContext, SplitImages

KS = (1, 5, 10)
SIMILARITY_BUDGET = 2**26  # entries of one [queries, candidates] block (256 MiB in float32)


def expected_recall(queries: torch.Tensor, candidates: torch.Tensor, positives: torch.Tensor,
                    ks: tuple[int, ...] = KS) -> dict[int, float]:
    """Mean Recall@K in percent: query i's positive is ``candidates[positives[i]]`` (ties broken at random)."""
    hits = {k: 0.0 for k in ks}
    step = max(1, SIMILARITY_BUDGET // max(1, len(candidates)))
    for start in range(0, len(queries), step):
        similarity = queries[start:start + step] @ candidates.T
        rows = torch.arange(len(similarity), device=similarity.device)
        positive = similarity[rows, positives[start:start + step].to(similarity.device)][:, None]
        greater = (similarity > positive).sum(dim=1).double()
        ties = (similarity == positive).sum(dim=1).double() - 1
        for k in ks:
            hits[k] += ((k - greater).clamp(min=0) / (ties + 1)).clamp(max=1).sum().item()
    return {k: 100.0 * v / len(queries) for k, v in hits.items()}


class Retrieval:
    """Image-to-text and text-to-image Recall@1/5/10 on a paired split; only a sample's own caption counts.

    ``split``: the paired split to retrieve in (``test``, held out, by default). Every sample's caption is
    a candidate (captions that several samples share are encoded once, and tie); ties count in expectation.
    """

    def __init__(self, split: Literal["test", "train"] = "test") -> None:
        self.split = split
        self._seen: dict[str, Any] = {}

    def protocol(self) -> dict[str, Any]:
        """Split, pair and tie rules, and counts once ``evaluate`` has run."""
        return {"evaluator": "image-text retrieval Recall@K (Radford et al. 2021; Jia et al. 2021)",
                "split": self.split, "ks": list(KS), "similarity": "cosine (L2-normalised embeddings)",
                "positive": "the sample's own pair only (identical captions of other samples are negatives)",
                "ties": "expected recall under uniformly random tie-breaking", **self._seen}

    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        split = getattr(ctx.dataset, self.split)
        captions = getattr(split, "captions", None) or [split[i]["text"] for i in range(len(split))]
        unique = list(dict.fromkeys(captions))
        position = {c: i for i, c in enumerate(unique)}
        caption_index = torch.as_tensor([position[c] for c in captions])
        images = ctx.encode_images(SplitImages(split))
        texts = ctx.encode_texts(unique).to(images.device)[caption_index.to(images.device)]  # one per sample
        self._seen = {"pairs": len(split), "distinct_captions": len(unique)}
        pairs = torch.arange(len(split))
        image_to_text = expected_recall(images, texts, pairs)
        text_to_image = expected_recall(texts, images, pairs)
        return {**{f"i2t_r{k}": v for k, v in image_to_text.items()},
                **{f"t2i_r{k}": v for k, v in text_to_image.items()}}
