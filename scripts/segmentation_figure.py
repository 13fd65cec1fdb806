"""The figure of docs/results.md's "Dense features" section: test canvases of cluttered Fashion-MNIST, their patch
masks, and the segmentation head's prediction on the unpatched backbone and on ATS-patched ones with the default
restore rule at two budgets (the kept tokens of the last ATS block outlined).

    python scripts/segmentation_figure.py --out docs/results/segmentation/restored.png
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import List, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

import ats  # noqa: E402
from ats.data.cluttered_segmentation import BACKGROUND, SEGMENTATION_CLASSES, cluttered_segmentation_test  # noqa: E402
from ats.merging import DEFAULT_RESTORE_RULE  # noqa: E402
from ats.reference import load_reference_cluttered, load_reference_segmentation_head  # noqa: E402

#: The two budgets: ATS multi-stage rho = 1 from block 3 with fuse and these distinct thresholds.
DISTINCTS = (0.99, 0.95)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--canvases", type=int, nargs="+", default=[0, 1, 2], help="test canvas indices")
    parser.add_argument("--out", type=Path, default=Path("docs/results/segmentation/restored.png"))
    return parser.parse_args(argv)


@torch.inference_mode()
def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    model, head = load_reference_cluttered(), load_reference_segmentation_head()
    data = cluttered_segmentation_test()
    images = torch.stack([data[index][0] for index in args.canvases])
    masks = torch.stack([data[index][1] for index in args.canvases])
    columns = [("canvas", None, None), ("mask", masks, None),
               ("unpatched", head(model.forward_features(images)).argmax(dim=1), None)]
    for distinct in DISTINCTS:
        ats.patch(model, ats.ATSConfig.multi_stage(1.0, fuse=True, distinct=distinct, restore=DEFAULT_RESTORE_RULE))
        predicted = head(model.forward_features(images)).argmax(dim=1)
        stats = ats.last_stats(model)
        saved = 100 * (1 - float(stats.gflops.mean()) / ats.gflops(ats.unpatch(model)))
        columns.append((f"distinct={distinct:g}: {saved:.0f}% saved", predicted, stats.kept[max(stats.kept)]))
    colours = ListedColormap([plt.get_cmap("tab10")(i) for i in range(BACKGROUND)] + [(0.05, 0.05, 0.05, 1.0)])
    figure, axes = plt.subplots(len(images), len(columns), figsize=(2.2 * len(columns), 2.3 * len(images)),
                                squeeze=False)
    for row in range(len(images)):
        for column, (title, labels, kept) in enumerate(columns):
            axis = axes[row, column]
            axis.set_xticks([])
            axis.set_yticks([])
            if labels is None:
                axis.imshow(images[row, 0], cmap="gray")
                axis.set_ylabel(SEGMENTATION_CLASSES[int(masks[row][masks[row] != BACKGROUND][0])])
            else:
                axis.imshow(labels[row], cmap=colours, vmin=0, vmax=BACKGROUND, interpolation="nearest")
            if kept is not None:
                grid = masks.shape[-1]
                for patch in kept[row][kept[row] >= 0].tolist():
                    axis.add_patch(plt.Rectangle((patch % grid - 0.5, patch // grid - 0.5), 1, 1, fill=False,
                                                 edgecolor="white", linewidth=0.6))
            if row == 0:
                axis.set_title(title, fontsize=8)
    figure.suptitle(f"restore={DEFAULT_RESTORE_RULE}; white squares: the tokens the last ATS block kept", fontsize=9)
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
