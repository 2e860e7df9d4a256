"""Qwen3-VL (``Qwen3VLForConditionalGeneration``): as Qwen2.5-VL (merged 2x2 tokens, M-RoPE), plus
DeepStack and a tower without windows.

* DeepStack: the tower also merges the hidden states of a few of its layers
  (``deepstack_visual_indexes``); level i is added to the visual tokens' hidden states after LM layer
  i. We carry those features with the merged tokens, gather the *same* kept indices at every level
  (``Stream.deepstack``), and the prefill adds them after the matching layers, also after in-LLM
  pruning (``operators.prefill``).
* The VisPruner score is the attention received in the tower's last block (every block attends
  over the whole image or temporal step; there is no window order to undo).
* A video is one media item per temporal step: Qwen3-VL's processor writes each step as its own
  ``<t seconds><|vision_start|>...<|vision_end|>`` block, so each step is its own placeholder run
  and its own t=1 grid for the positions. The tower attends within a step either way, so encoding
  the steps as separate items gives HF's video features.
"""

from __future__ import annotations

import torch

from operators.families.base import MediaInput
from operators.families.qwen2_5_vl import VIDEO_FPS, Qwen2_5_VLAdapter


def step_timestamps(frames: int, fps: float, temporal: int) -> list[float]:
    """Seconds of each temporal step, as HF's Qwen3-VL processor: frame times padded with the last
    frame to a multiple of ``temporal``, then the mean of each step's first and last frame."""
    indices = list(range(frames))
    indices += [indices[-1]] * (-len(indices) % temporal)
    times = [i / fps for i in indices]
    return [(times[i] + times[i + temporal - 1]) / 2 for i in range(0, len(times), temporal)]


class Qwen3VLAdapter(Qwen2_5_VLAdapter):
    """Qwen3-VL: DeepStack features follow the kept tokens; per-step video items with timestamps."""

    family = "qwen3_vl"
    model_class = "Qwen3VLForConditionalGeneration"

    def score_block(self) -> int:
        return self.config.vision_config.depth - 1

    def window_index(self, grid_thw: torch.Tensor) -> None:
        return None  # no windowed attention: the tower runs in raster (merge-group) order

    @staticmethod
    def rotary():
        from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb_vision

        return apply_rotary_pos_emb_vision

    def video_items(self, prompt: str, video) -> tuple[str, list[MediaInput]]:
        whole = self.video_input(video)
        steps, h, w = whole.grid
        frames = len(video)
        times = step_timestamps(frames, VIDEO_FPS, self.temporal)
        blocks = "".join(f"<{t:.1f} seconds><|vision_start|>{self.video_tag}<|vision_end|>" for t in times)
        per_step = h * w // self.merge**2
        items = [
            MediaInput("video", whole.pixel_values[s : s + 1], tokens=per_step, grid=(1, h, w)) for s in range(steps)
        ]
        return prompt.replace(self.video_tag, blocks), items
