"""KNN on pooled features with SPADE localisation."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sroc.detectors.base import (
    MB,
    BaseDetector,
    align_stages,
    gap_embedding,
    gap_pooling_flops,
    grid_and_dim,
    n_workers,
)
from sroc.detectors.neighbours import apply_metric, check_metric, nearest_sq_distances


class KNNDetector(BaseDetector, name="knn", label="KNN"):
    """KNN on global-average-pooled features with SPADE localisation (SROC paper, 3.1.1).

    Image score: mean distance of the image embedding (GAP of each stage, concatenated) to its
    ``n_neighbors`` nearest training embeddings. Map: for each location of the map grid (the
    finest stage's, or ``grid_stage``'s), the stages are aligned (``upsample``) and concatenated;
    the location's feature is compared with a gallery made of the patch features of the
    ``n_neighbors`` retrieved training images.

    ``fit`` keeps the GAP embeddings and a reference to the training features (no copy): the
    galleries are aligned from them when maps are requested, one test image at a time, so
    image-only scoring never builds the aligned training patches (n_train x H x W x D float32,
    1.4 GB for 392 elpv images at 48 x 48 x 376, against 330 MB for the features themselves).
    Do not modify the training features in place between ``fit`` and ``score``.

    Parameters
    ----------
    n_neighbors : k of the image-level KNN (the paper uses 5).
    metric : "euclidean" (default; the paper's text, "average euclidean distance", and SPADE) or
        "sqeuclidean" (the squared norm written in the paper's eq. 1). Applies to maps as well.
    gallery : "all_locations" (SPADE: the gallery holds every location of the retrieved images
        and a test patch is scored by its ``n_patch_neighbors`` nearest gallery features) or
        "same_location" (a literal reading of the paper: mean distance to the retrieved images'
        features at the same location).
    n_patch_neighbors : kappa of SPADE, patch neighbours averaged in "all_locations" mode.
    upsample : "nearest" or "bilinear" alignment of the coarser stages on the map grid.
    grid_stage : stage whose grid the maps live on; finer stages are area-averaged onto it.
        None (default, SPADE) uses the finest stage's grid. A coarser grid cuts the map search
        by its location count squared: ``blocks.4`` (stride 16) instead of ``blocks.2``
        (stride 8) makes it 16 times cheaper. Image scores do not depend on it.
    stages : stages to use, None for all stages given to fit.
    exclude_self : score() then expects the training features and excludes each image from its
        own neighbours (leave-one-out). The default (False) follows the paper: a training image
        finds itself at distance 0 among its k neighbours.
    n_jobs : chunks of work run at once (None: one per available CPU); the results do not
        depend on it (see :mod:`sroc.detectors.base`).
    random_state : accepted so that every detector takes the same arguments; KNN involves no
        randomness.
    """

    runtime_seconds_per_image = 0.01
    supports_exclude_self = True

    def __init__(
        self,
        n_neighbors: int = 5,
        metric: str = "euclidean",
        gallery: str = "all_locations",
        n_patch_neighbors: int = 1,
        upsample: str = "nearest",
        grid_stage: str | None = None,
        stages: Sequence[str] | None = None,
        exclude_self: bool = False,
        n_jobs: int | None = None,
        random_state: int | None = None,
    ):
        self.n_neighbors = n_neighbors
        self.metric = metric
        self.gallery = gallery
        self.n_patch_neighbors = n_patch_neighbors
        self.upsample = upsample
        self.grid_stage = grid_stage
        self.stages = stages
        self.exclude_self = exclude_self
        self.n_jobs = n_jobs
        self.random_state = random_state

    def _fit(self, features: dict[str, np.ndarray]) -> None:
        check_metric(self.metric)
        if self.gallery not in ("all_locations", "same_location"):
            raise ValueError(
                f"gallery must be 'all_locations' or 'same_location', got {self.gallery!r}"
            )
        self._use_grid_stage(features, self.grid_stage)
        available = self.n_train_ - 1 if self.exclude_self else self.n_train_
        if not 1 <= self.n_neighbors <= available:
            raise ValueError(
                f"n_neighbors={self.n_neighbors} must be in [1, {available}] for {self.n_train_} "
                f"training images{' with exclude_self' if self.exclude_self else ''}"
            )
        gallery_size = self.n_neighbors * self.grid_hw_[0] * self.grid_hw_[1]
        if self.gallery == "all_locations" and not 1 <= self.n_patch_neighbors <= gallery_size:
            raise ValueError(
                f"n_patch_neighbors={self.n_patch_neighbors} must be in [1, {gallery_size}] "
                "(the patches of the retrieved images)"
            )
        self.train_embeddings_ = gap_embedding(features, self.stages_, self._run_chunks)
        self.train_features_ = features

    _chunked = True

    def _score(
        self, features: dict[str, np.ndarray], maps: bool
    ) -> tuple[np.ndarray, np.ndarray | None]:
        embeddings = gap_embedding(features, self.stages_, self._run_chunks)
        excluded = None
        if self.exclude_self:
            self._check_self_scoring(embeddings)
            excluded = np.eye(self.n_train_, dtype=bool)
        sq, neighbours = nearest_sq_distances(
            embeddings, self.train_embeddings_, self.n_neighbors, excluded
        )
        image_scores = apply_metric(sq, self.metric).mean(axis=1)
        if not maps:
            return image_scores, None
        height, width = self.grid_hw_
        anomaly_maps = np.empty((embeddings.shape[0], height, width), dtype=np.float32)

        def score_image(block: slice) -> None:
            for index in range(block.start, block.stop):
                test_patches = self._patches(features, [index])[0]
                retrieved = self._patches(self.train_features_, neighbours[index])
                anomaly_maps[index] = self._patch_scores(test_patches, retrieved).reshape(
                    height, width
                )

        self._run_chunks(score_image, embeddings.shape[0], 1)
        return image_scores, anomaly_maps

    def _patches(self, features: dict[str, np.ndarray], images) -> np.ndarray:
        """Aligned patch features of some images, (len(images), H*W, D) float32."""
        aligned = align_stages(
            {s: features[s][images] for s in self.stages_},
            self.stages_,
            self.upsample,
            self.grid_hw_,
        )
        return aligned.reshape(aligned.shape[0], aligned.shape[1], -1).transpose(0, 2, 1)

    def _patch_scores(self, test_patches: np.ndarray, retrieved: np.ndarray) -> np.ndarray:
        """Score each of the L test patches (L, D) against the retrieved images (k, L, D)."""
        if self.gallery == "same_location":
            diff = retrieved - test_patches[None]
            return apply_metric(np.einsum("kld,kld->kl", diff, diff), self.metric).mean(axis=0)
        gallery = retrieved.reshape(-1, retrieved.shape[-1])
        sq, _ = nearest_sq_distances(test_patches, gallery, self.n_patch_neighbors)
        return apply_metric(sq, self.metric).mean(axis=1)

    def _estimate_state_mb(self, n_train, n_test, shapes):
        locations, dim = grid_and_dim(shapes)  # the finest grid: a bound for grid_stage
        embeddings_mb = (n_train + n_test) * dim * 8 / MB
        # Per running chunk: one aligned test image and gallery (gathered stages, upsampled,
        # concatenated, transposed) and the gallery's distance matrix with the top-k workspace.
        gallery_mb = (self.n_neighbors + 1) * locations * dim * 4 * 3 / MB
        distances_mb = locations * self.n_neighbors * locations * 4 * 2 / MB
        return embeddings_mb + n_workers(self.n_jobs) * (gallery_mb + distances_mb)

    def fit_flops(self, shapes, n_fit):
        return n_fit * gap_pooling_flops(self.used_shapes(shapes))  # the rest is a copy

    def score_flops(self, shapes, n_fit, n_score, maps):
        shapes = self.used_shapes(shapes)
        locations, channels = grid_and_dim(shapes)
        flops = n_score * gap_pooling_flops(shapes) + 2 * n_score * n_fit * channels
        if maps:
            k = self.n_neighbors
            if self.gallery == "same_location":
                flops += 3 * n_score * k * locations * channels
            else:
                flops += 2 * n_score * locations * k * locations * channels
        return flops
