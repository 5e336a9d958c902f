"""Interactive click segmentation with the 3D models (FastSAM3D, SAM-Med3D-turbo).

The window is a 128^3 grid of 1.5 mm voxels sampled from the stored image as the official
pipeline samples it (geometry.sample_window); ModelSpec.window_grid says whether it is centred on
the clicks ("clicks") or placed on the official 1.5 mm grid ("official", geometry.place_window).

Per click: the model window is kept while the clicks stay inside it, so its embedding (cached
per image file and window) is reused and only the decoder runs; the previous low-res logits of
the same interaction are the mask prompt.
"""

import numpy as np

from .engine import ClickEngine, Interaction
from .errors import InputError
from .geometry import WINDOW_GRIDS, WindowGeometry, apply, place_window, sample_window
from .predictor import SamPredictor3D
from .request import ClickRequest

WINDOW_MARGIN_VOXELS = 4  # a click closer than this to the window's faces moves the window


class ClickSegmenter3D(ClickEngine):
    dimension = 3

    def __init__(self, spec, *args, **kwargs):
        grid = spec.window_grid
        if grid not in WINDOW_GRIDS:  # a registry typo stops the app at start-up, not at the first click
            raise ValueError(f"{spec.name}: window_grid must be one of {', '.join(WINDOW_GRIDS)}, got {grid!r}")
        super().__init__(spec, *args, **kwargs)

    def make_predictor(self, model) -> SamPredictor3D:
        return SamPredictor3D(model, self.dtype)

    def predict(self, image_path: str, request: ClickRequest) -> dict:
        image = self.images.get(image_path)
        clicks = request.clicks_in(image.array.shape)
        clicks_ras = apply(image.affine, [point for point, _ in clicks])
        size = self.spec.input_size[0]

        previous = self.previous(request, image_path, image, clicks)
        keep_window = previous is not None and previous.place.contains(clicks_ras, WINDOW_MARGIN_VOXELS).all()
        if keep_window:
            window = previous.place
        else:  # all clicks where they fit, else centred on the newest click
            known = set(previous.clicks) if previous is not None else set()
            positives = [i for i, click in enumerate(clicks) if click[1] == 1]
            new = [i for i in positives if clicks[i] not in known] or positives
            window = place_window(image.affine, clicks_ras, size, self.spec.spacing_mm, anchor_ras=clicks_ras[new[-1]],
                                  grid=self.spec.window_grid)
        inside = window.contains(clicks_ras)
        if not any(label == 1 and ok for (_, label), ok in zip(clicks, inside)):
            raise InputError("no positive click inside the model window")

        predictor = self.predictor()
        with self._model_lock:
            embedding_key = (image.key, window.key())
            embedding = self.embeddings.get(embedding_key)
            embedding_reused = embedding is not None
            if embedding is None:
                embedding = predictor.set_volume(self.spec.preprocess(sample_window(image.array, image.affine, window)))
                self.encoder_runs += 1
                self.embeddings.put(embedding_key, embedding)
            predictor.set_embedding(embedding)
            prompts = {"points": window.to_window(clicks_ras[inside])[None],
                       "labels": np.array([[label for (_, label), ok in zip(clicks, inside) if ok]])}
            mask_prompt = previous.low_res_logits if keep_window else np.zeros((1, 1, *(s // 4 for s in self.spec.input_size)),
                                                                              np.float32)
            logits, iou = self.decode(predictor, prompts, mask_prompt, request.ensemble_size)

        info = {
            "model": self.spec.name,
            "weights": self.weights_name(),  # the file served: a fine-tuning run's once one is written
            "interaction_continued": previous is not None,  # False: a new one (e.g. another replica, a reset)
            "window_reused": bool(keep_window),
            "embedding_reused": embedding_reused,
            "window_affine": np.round(window.affine, 6).tolist(),
            "window_size": window.size,
            "clicks_used": int(inside.sum()),
            "clicks_outside_window": int((~inside).sum()),
            "predicted_iou": float(iou.reshape(-1)[0]),
        }
        return {"logits": logits, "geometry": WindowGeometry(window, image.array.shape, image.affine),
                "affine": image.affine, "result": info, "click_request": request, "image_path": image_path,
                "interaction": Interaction(image.key, clicks, window)}
