"""Built-in encoders: a small ViT image tower and a byte-level CLIP-style text tower."""

from orchestrator import hookimpl


@hookimpl
def register_encoders(register):
    register("vit", "plugins.encoders.vit:VisionTransformer", modality="image")
    register("text-transformer", "plugins.encoders.text_transformer:TextTransformer", modality="text")
