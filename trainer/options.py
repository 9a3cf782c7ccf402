"""Training options: every MISSION.md §1 number with its reference default, resolved from a request.

Unset proto fields (``optional``) take the default; set ones are range-checked and a violation is an
:class:`InvalidArgument` naming the field (``options.rank``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from easyphoto.rpc.errors import InvalidArgument, check_length, check_range
from easyphoto.rpc.server import present_fields
from easyphoto.v1 import trainer_pb2

CAPTION = "easyphoto_face, easyphoto, 1person"
MAX_PHOTOS = 50


@dataclass(frozen=True)
class TrainingOptions:
    max_kept_photos: int = 15
    drop_different_person: bool = False
    crop_scale: float = 3.0
    tighten_x: float = 0.30
    tighten_top: float = 0.15
    tighten_bottom: float = 0.15
    portrait_enhancement: bool = False
    skin_retouching: bool = False
    caption: str = CAPTION
    rank: int = 128
    alpha: float = 64.0
    unet_learning_rate: float = 1e-4
    text_encoder_learning_rate: float = 5e-5
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    resolution: int = 512
    batch_size: int = 1
    gradient_accumulation_steps: int = 4
    steps_per_photo: int = 200
    max_train_steps: int = 800
    random_flip: bool = True
    mixed_precision: bool = True
    train_text_encoder: bool = True
    validation_interval: int = 100
    validation_templates: int = 4
    validation_strength: float = 0.65
    validation_steps: int = 20
    validation_guidance_scale: float = 9.0
    validation_mask_scale: float = 1.3
    merge_top_k: int = 10
    identity_reward: bool = False
    reward_iterations: int = 20
    reward_samples_per_template: int = 4
    reward_learning_rate: float = 3e-4
    reward_clip_range: float = 1e-4
    reward_max_seconds: float = 1800.0
    seed: int | None = None

    def train_steps(self, photos: int) -> int:
        """Optimizer steps: min(photos × steps_per_photo, max_train_steps)."""
        return min(photos * self.steps_per_photo, self.max_train_steps)

    def to_proto(self) -> trainer_pb2.TrainingOptions:
        values = {k: v for k, v in asdict(self).items() if v is not None}
        return trainer_pb2.TrainingOptions(**values)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> TrainingOptions:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


RANGES: dict[str, tuple[float, float]] = {
    "max_kept_photos": (1, MAX_PHOTOS),
    "crop_scale": (1.5, 6.0),
    "tighten_x": (0.0, 1.0),
    "tighten_top": (0.0, 1.0),
    "tighten_bottom": (0.0, 1.0),
    "rank": (1, 512),
    "alpha": (0.01, 1024.0),
    "unet_learning_rate": (0.0, 1.0),
    "text_encoder_learning_rate": (0.0, 1.0),
    "weight_decay": (0.0, 1.0),
    "max_grad_norm": (0.0, 1e6),
    "resolution": (64, 1024),
    "batch_size": (1, 16),
    "gradient_accumulation_steps": (1, 64),
    "steps_per_photo": (1, 10_000),
    "max_train_steps": (1, 100_000),
    "validation_interval": (1, 100_000),
    "validation_templates": (1, 16),
    "validation_strength": (0.01, 1.0),
    "validation_steps": (1, 200),
    "validation_guidance_scale": (1.0, 30.0),
    "validation_mask_scale": (1.0, 4.0),
    "merge_top_k": (1, 1000),
    "reward_iterations": (1, 1000),
    "reward_samples_per_template": (2, 32),
    "reward_learning_rate": (0.0, 1.0),
    "reward_clip_range": (1e-6, 1.0),
    "reward_max_seconds": (1.0, 86_400.0),
}


# The tiny test family trains at its own image size: the reference's 512 px, 800 steps and
# rank 128 take over two hours on 2 cores there for weights that paint noise. These end a job of
# 5 photos in about 40 s on 2 cores (20 photos: the same steps); set fields still win.
TINY_FAMILY_TRAINING = TrainingOptions(
    rank=8,
    alpha=4.0,
    resolution=128,
    gradient_accumulation_steps=1,
    steps_per_photo=100,
    max_train_steps=400,
    validation_interval=100,
    validation_templates=2,
    validation_steps=10,
)


def training_defaults(models: str) -> tuple[TrainingOptions, str]:
    """The defaults of unset options for a trainer serving ``models`` (its ``--models``), and
    their name, which the training report records."""
    if models == "tiny":
        return TINY_FAMILY_TRAINING, "tiny family (resolution, steps and rank scaled down)"
    return TrainingOptions(), "reference (SD 1.5)"


# CLIP reads 77 tokens of a caption; far longer text is a mistake, refused before it is stored.
MAX_CAPTION_CHARS = 4000


def resolve_training_options(
    message: trainer_pb2.TrainingOptions, defaults: TrainingOptions | None = None
) -> TrainingOptions:
    values = present_fields(message, (f.name for f in fields(TrainingOptions)))
    options = replace(defaults or TrainingOptions(), **values)
    for name, (low, high) in RANGES.items():
        check_range(f"options.{name}", getattr(options, name), low, high)
    if options.resolution % 8:
        raise InvalidArgument("options.resolution must be a multiple of 8", field="options.resolution")
    if not options.caption.strip():
        raise InvalidArgument("options.caption is empty", field="options.caption")
    check_length("options.caption", options.caption, MAX_CAPTION_CHARS)
    return options
