"""Figures of mixture-of-experts routing (matplotlib, headless): which experts each modality uses,
per MoE layer (LIMoE's "modality-specialised experts" figure), and routing success over training.

    plot_expert_usage({"layers": [1, 3], "image_tokens": [[...E], [...]], "text_tokens": ...},
                      "runs/limoe/routing_experts.png")
    plot_routing_history(history, "runs/limoe/routing_success.png")
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_expert_usage(usage: Dict[str, Sequence], path: str, title: str = "") -> str:
    """Stacked bars per MoE layer: tokens of each modality routed to each expert.

    Args:
      usage: ``{"layers": [l...], "image_tokens": [[E] per layer], "text_tokens": [[E] ...]}``
        (token counts; a bar's label is the share of image tokens, as in the LIMoE blog figure).
      path: the PNG to write.
    Returns: ``path``.
    """
    plt = _pyplot()
    layers = list(usage["layers"])
    image = np.asarray(usage["image_tokens"], np.float64)                # [layers, E]
    text = np.asarray(usage["text_tokens"], np.float64)
    experts = image.shape[1]
    fig, axes = plt.subplots(1, len(layers), figsize=(max(4.0, 0.6 * experts + 2) * len(layers),
                                                      3.6), squeeze=False)
    for ax, layer, img, txt in zip(axes[0], layers, image, text):
        x = np.arange(experts)
        ax.bar(x, img, color="tab:red", label="image tokens")
        ax.bar(x, txt, bottom=img, color="tab:blue", label="text tokens")
        total = img + txt
        for e in range(experts):
            if total[e] > 0:
                ax.text(e, total[e], f"{100 * img[e] / total[e]:.0f}%", ha="center",
                        va="bottom", fontsize=8)
        ax.set_xticks(x)
        ax.set_xlabel("expert")
        ax.set_title(f"MoE block {layer}")
    axes[0][0].set_ylabel("tokens routed (label: % image)")
    axes[0][0].legend(loc="upper left", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_routing_history(history: List[Dict], path: str) -> str:
    """Routing success per MoE layer and modality over training steps.

    Args:
      history: ``[{"step": s, "layers": [l...], "success_image": [..], "success_text": [..]}]``.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    steps = [h["step"] for h in history]
    layers = history[0]["layers"] if history else []
    for i, layer in enumerate(layers):
        for modality, style in (("image", "-"), ("text", "--")):
            ax.plot(steps, [h[f"success_{modality}"][i] for h in history], style,
                    label=f"block {layer} {modality}")
    ax.set_xlabel("train step")
    ax.set_ylabel("routing success")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
