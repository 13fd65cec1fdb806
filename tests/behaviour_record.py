"""The behaviour the package must keep through refactoring: logits, GFLOPs, kept tokens and tokens per block of
the bundled reference models (and small random-init timm and Hugging Face models) under one config of each
method, on fixed inputs. ``python tests/behaviour_record.py`` writes ``tests/data/behaviour_record.pt`` (made
before the adapters and methods were reorganised); tests/test_behaviour_record.py checks the package against it."""
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch

import ats
from ats import reference

RECORD = Path(__file__).parent / "data" / "behaviour_record.pt"


def configs(depth: int = 12) -> Dict[str, object]:
    return {
        "rho0.7": ats.ATSConfig.multi_stage(0.7, depth=depth),
        "K48": ats.ATSConfig.single_stage(48),
        "recommended": ats.ATSConfig.recommended(depth=depth),
        "topk": ats.ATSConfig.multi_stage(0.87, depth=depth, sampler="topk"),
        "released": ats.ATSConfig.multi_stage(1.0, depth=depth, sampler="released"),
        "evit": ats.EViTConfig(0.7),
        "stacked": ats.StackedConfig(ats.EViTConfig(0.7, blocks=(3,)), ats.ATSConfig({5: 0.7, 8: 0.7})),
        "merge": ats.MergeConfig(8),
        "saint": ats.SAINTConfig(0.9),
        "keep_all": ats.KeepAllConfig(),
    }


def video_configs() -> Dict[str, object]:
    return {"rho1-3..7": ats.ATSConfig({i: 1.0 for i in range(3, 8)}),
            "distinct": ats.ATSConfig({i: 1.0 for i in range(3, 8)}, fuse=True, distinct=0.9)}


def _hf_vit() -> torch.nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(image_size=32, patch_size=4, hidden_size=48, num_hidden_layers=12,
                                               num_attention_heads=4, intermediate_size=96, num_labels=5))


def _timm(name: str, **kwargs) -> Callable[[], torch.nn.Module]:
    def create() -> torch.nn.Module:
        import timm

        torch.manual_seed(0)
        return timm.create_model(name, pretrained=False, **kwargs)
    return create


#: name -> (model factory, input shape, configs)
MODELS: Dict[str, Tuple[Callable[[], torch.nn.Module], Tuple[int, ...], Callable[[], Dict[str, object]]]] = {
    "reference": (reference.load_reference_model, (1, 28, 28), configs),
    "cluttered": (reference.load_reference_cluttered, (1, 56, 56), configs),
    "cvt": (reference.load_reference_cvt, (1, 28, 28),
            lambda: {"rho0.7": ats.ATSConfig.multi_stage(0.7, depth=10), "keep_all": ats.KeepAllConfig(3)}),
    "psvit": (reference.load_reference_psvit, (1, 28, 28), lambda: {k: v for k, v in configs(10).items()
                                                                  if k in ("rho0.7", "recommended", "evit")}),
    "video": (reference.load_reference_video, (8, 1, 64, 64), video_configs),
    "xvit": (reference.load_reference_xvit, (8, 1, 64, 64), video_configs),
    "hf_vit": (_hf_vit, (3, 32, 32), lambda: {k: v for k, v in configs().items()
                                              if k in ("rho0.7", "recommended", "merge", "saint")}),
    "eva": (_timm("vit_small_patch16_rope_224", img_size=64, depth=12, embed_dim=48, num_heads=4),
            (3, 64, 64), lambda: {"rho0.7": ats.ATSConfig.multi_stage(0.7)}),
    "beit": (_timm("beit_base_patch16_224", img_size=64, depth=12, embed_dim=48, num_heads=4),
             (3, 64, 64), lambda: {"rho0.7": ats.ATSConfig.multi_stage(0.7)}),
}


def inputs(shape: Tuple[int, ...], batch: int = 4) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(batch, *shape, generator=generator)


def observe(name: str) -> Dict[str, Dict[str, torch.Tensor]]:
    """For each config of model ``name``: its logits, per-image GFLOPs, tokens in and out of each block, the
    kept patch indices of each sampling block, and ``ats.gflops`` (the bound)."""
    factory, shape, make_configs = MODELS[name]
    model = factory().eval()
    images = inputs(shape)
    observed = {}
    with torch.no_grad():
        observed["unpatched"] = {"logits": _logits(model(images)),
                                 "bound": torch.tensor(ats.gflops(model))}
        for label, config in make_configs().items():
            ats.patch(model, config)
            logits = _logits(model(images))
            stats = ats.last_stats(model)
            entry = {"logits": logits, "gflops": stats.gflops, "tokens": stats.tokens, "tokens_out": stats.tokens_out,
                     "bound": torch.tensor(ats.gflops(model))}
            entry.update({f"kept{block}": kept for block, kept in stats.kept.items()})
            observed[label] = entry
            ats.unpatch(model)
    return observed


def _logits(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.logits


def main() -> None:
    record: Dict[str, Dict[str, Dict[str, torch.Tensor]]] = {name: observe(name) for name in MODELS}
    RECORD.parent.mkdir(exist_ok=True)
    torch.save(record, RECORD)
    sizes: List[str] = [f"{name}: {len(entries)}" for name, entries in record.items()]
    print(f"wrote {RECORD} ({', '.join(sizes)} configs)")


if __name__ == "__main__":
    main()
