"""Built-in losses."""

from orchestrator import hookimpl
from plugins.losses.options import resolve_tiled


@hookimpl
def register_losses(register):
    register("infonce", "plugins.losses.infonce:InfoNCE", needs={"image", "text"}, resolve=resolve_tiled)
    register("siglip", "plugins.losses.siglip:SigLIP", needs={"image", "text"}, resolve=resolve_tiled)
    register("soft-infonce", "plugins.losses.soft_infonce:SoftInfoNCE", needs={"image", "text"},
             resolve=resolve_tiled)
    register("filip", "plugins.losses.filip:FILIP", needs={"image-tokens", "text-tokens"}, resolve=resolve_tiled)
    register("ntxent", "plugins.losses.ntxent:NTXent", needs={"views"})
    register("supcon", "plugins.losses.supcon:SupCon", needs={"views", "label"})
    register("dcl", "plugins.losses.dcl:DCL", needs={"views"})
    register("dclw", "plugins.losses.dcl:DCLW", needs={"views"})
    register("align-uniform", "plugins.losses.align_uniform:AlignUniform", needs={"views"})
    register("barlow-twins", "plugins.losses.barlow_twins:BarlowTwins", needs={"views"})
    register("vicreg", "plugins.losses.vicreg:VICReg", needs={"views"})
    register("moco", "plugins.losses.moco:MoCo", needs={"views"})
    register("byol", "plugins.losses.byol:BYOL", needs={"views"})
    register("simsiam", "plugins.losses.simsiam:SimSiam", needs={"views"})
    register("swav", "plugins.losses.swav:SwAV", needs={"views"})
    register("dino", "plugins.losses.dino:DINO", needs={"views"})
