"""The paper's own numbers (Yang et al., DAC 2022, arXiv 2111.11986), for the "paper" columns.

Transcribed from the paper's text (`../shared/paper/hero-dac2022.txt`): Tables 1-3 and the Figure 1
values its Section 5.3 quotes (the figure's other points are only drawn, not printed). Accuracies in
percent, CIFAR-10/100 after 200 epochs; each entry names the table or section it comes from.
"""

from __future__ import annotations

# Table 1: test accuracy (full precision), by (dataset, model) and method.
TABLE1 = {
    ("cifar10", "resnet20"): {"hero": 93.44, "gradl1": 92.82, "sgd": 92.82},
    ("cifar10", "mobilenetv2"): {"hero": 95.03, "gradl1": 92.52, "sgd": 92.45},
    ("cifar10", "vgg19bn"): {"hero": 94.79, "gradl1": 93.41, "sgd": 93.89},
    ("cifar100", "resnet20"): {"hero": 70.72, "gradl1": 69.30, "sgd": 69.52},
    ("cifar100", "mobilenetv2"): {"hero": 76.90, "gradl1": 74.13, "sgd": 73.12},
    ("cifar100", "vgg19bn"): {"hero": 76.09, "gradl1": 74.05, "sgd": 74.61},
    ("imagenet", "resnet18"): {"hero": 71.05, "gradl1": 70.82, "sgd": 70.74},
}

# Table 2: CIFAR-10 test accuracy after training with symmetric label noise, by model, method, ratio.
TABLE2 = {
    "resnet20": {"hero": {0.2: 90.63, 0.4: 88.71, 0.6: 84.61, 0.8: 72.11},
                 "gradl1": {0.2: 85.91, 0.4: 78.66, 0.6: 65.86, 0.8: 48.28},
                 "sgd": {0.2: 85.64, 0.4: 78.73, 0.6: 66.42, 0.8: 42.17}},
    "mobilenetv2": {"hero": {0.2: 91.70, 0.4: 88.57, 0.6: 81.73, 0.8: 72.03},
                    "gradl1": {0.2: 89.00, 0.4: 85.56, 0.6: 79.73, 0.8: 30.34},
                    "sgd": {0.2: 89.28, 0.4: 85.84, 0.6: 80.49, 0.8: 62.91}},
}

# Table 3: MobileNetV2 on CIFAR-10 after post-training quantization, by method and weight bits
# (None: full precision). The paper's only ablation against first-order only.
TABLE3 = {
    "hero": {4: 93.45, 6: 94.90, 8: 95.03, None: 95.03},
    "first-order": {4: 91.61, 6: 93.92, 8: 94.00, None: 94.06},
    "sgd": {4: 85.88, 6: 91.81, 8: 92.33, None: 92.45},
}

# Figure 1 values quoted in Section 5.3: (panel, dataset, model, bits, method) -> accuracy, or the
# HERO-minus-baseline gain where only the gain is printed.
FIGURE1 = [
    ("1(b)", "cifar10", "mobilenetv2", 4, {"hero": 93.45, "gradl1": 87.34, "sgd": 85.88}),
    ("1(c)", "cifar10", "vgg19bn", 5, {"hero": 93.57, "gradl1": 89.03, "sgd": 80.22}),
]
FIGURE1_GAINS = [
    ("1(e)", "cifar100", "mobilenetv2", 4, {"gradl1": 10.05, "sgd": 16.10}),  # HERO minus each, points
]

PAPER_DATASET = "cifar10"  # the dataset our small scale's "paper" columns quote (ours is Fashion-MNIST)


def table1_value(model: str, method: str, dataset: str = PAPER_DATASET) -> str:
    value = TABLE1.get((dataset, model), {}).get(method)
    return "—" if value is None else f"{value:.2f} ({dataset} {model}, Table 1)"


def table2_value(model: str, method: str, ratio: float) -> str:
    value = TABLE2.get(model, {}).get(method, {}).get(round(ratio, 2))
    return "—" if value is None else f"{value:.2f}"


def table3_value(method: str) -> str:
    """The paper's Table 3 row of a method as '4/6/8-bit/full' (MobileNetV2 on CIFAR-10); Gradient-L1,
    which Table 3 lacks, gets its 4-bit Figure 1(b) value quoted in Section 5.3."""
    row = TABLE3.get(method)
    if row is not None:
        return "/".join(f"{row[b]:.2f}" for b in (4, 6, 8, None)) + " (4/6/8/full; cifar10 mobilenetv2, Table 3)"
    quoted = FIGURE1[0][4].get(method)
    return "—" if quoted is None else f"4-bit {quoted:.2f} (cifar10 mobilenetv2, Fig. 1(b) in Sec. 5.3)"


def figure1_value(method: str) -> str:
    """Every Figure 1 value Section 5.3 quotes for a method."""
    parts = [f"{panel} {dataset} {model} {bits}-bit: {values[method]:.2f}"
             for panel, dataset, model, bits, values in FIGURE1 if method in values]
    parts += [f"{panel} {dataset} {model} {bits}-bit: HERO {gain:+.2f} over this"
              for panel, dataset, model, bits, gains in FIGURE1_GAINS for m, gain in gains.items() if m == method]
    return "; ".join(parts) or "—"
