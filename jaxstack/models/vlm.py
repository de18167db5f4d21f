"""NVILA vision-language model: SigLIP tower -> 2x2 projector -> Qwen2-family LLM.

Pipeline (§1 of the project spec vlm.md, ../shared/specs/vlm.md outside this repository):
images/frames [N, H, W, 3] (NHWC) go through `SiglipVisionTower` (features = hidden_states[-2], no
post-LN) -> `tokens_to_map` -> `Projector2x2` giving [N, tokens, D_llm]. Video frames are then
averaged over groups of `frames_per_group` consecutive frames (TSP `pool_sizes [[8, 1, 1]]`) and
each group is followed by the LLM's embedding of the separator token ("\\n"). Media embeddings are
spliced into the prompt at the placeholder (`media_token_id`) positions with `merge_multimodal`.

`encode_video(model, frames, mesh=...)` runs the per-frame tower + projector data-parallel over
the frames inside `shard_map` (each device only sees its own pixels); only projected tokens are
combined for the temporal pooling.

Long-video prompts with sequence parallelism (LongVILA MM-SP, `jaxstack.parallel.multimodal`):
`plan_video_prompt` splits the temporal-pooling groups over the mesh's `sequence` axis,
`encode_video_groups_sp` encodes each device's own groups once, and `video_prompt_logits_sp` /
`video_prompt_loss_sp` route the visual tokens to their sequence shards and run the LLM with
sequence-parallel attention.

Shapes: N images/frames, T frames, G = ceil(T / frames_per_group) groups, n tokens per frame
after the projector (= ceil(grid/2)^2), D LLM hidden size, B batch, L text length, V vocab.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxstack.models.llm import LLM, LLMConfig
from jaxstack.models.nvila_connector import (
    Projector2x2,
    interleave_separators,
    merge_multimodal,
    temporal_pool,
    tokens_to_map,
)
from jaxstack.models.siglip import SiglipConfig, SiglipVisionTower
from jaxstack.parallel.mesh import use_mesh
from jaxstack.parallel.multimodal import MMShardPlan, plan_mm_sharding, shard_multimodal_embeddings
from jaxstack.parallel.sequence import shard_map

Array = jax.Array

PROJECTORS = ("2x2",)


@dataclasses.dataclass(frozen=True)
class VLMConfig:
    """NVILA sizes: vision tower, LLM, connector and the special token ids.

    projector: connector type ("2x2" = `mlp_downsample_2x2_fix`, the only one wired here).
    frames_per_group: frames averaged per temporal-pooling group (8 in NVILA).
    media_token_id: placeholder token id replaced by media embeddings in the prompt.
    separator_token_id: token whose LLM embedding follows each video group ("\\n").
    select_layer: SigLIP hidden_states index used as features (-2 in NVILA).
    freeze_vision: stop gradients at the tower output (tower frozen during training).
    """

    vision: SiglipConfig = dataclasses.field(default_factory=lambda: SiglipConfig.preset("tiny"))
    llm: LLMConfig = dataclasses.field(default_factory=lambda: LLMConfig.preset("tiny"))
    projector: str = "2x2"
    frames_per_group: int = 8
    media_token_id: int = 511
    separator_token_id: int = 10
    select_layer: int = -2
    freeze_vision: bool = False

    def __post_init__(self) -> None:
        if self.projector not in PROJECTORS:
            raise ValueError(f"unknown projector {self.projector!r}; supported: {PROJECTORS}")
        if self.frames_per_group < 1:
            raise ValueError(f"frames_per_group must be >= 1, got {self.frames_per_group}")
        for name in ("media_token_id", "separator_token_id"):
            tok = getattr(self, name)
            if not 0 <= tok < self.llm.vocab_size:
                raise ValueError(f"{name}={tok} outside vocab [0, {self.llm.vocab_size})")

    @property
    def tokens_per_frame(self) -> int:
        """Projected tokens per image/frame: ceil(grid / 2) ** 2 (256 for 448 px / patch 14)."""
        return math.ceil(self.vision.grid_size / 2) ** 2

    def video_length(self, num_frames: int) -> int:
        """Rows of `encode_video` output: G * (tokens_per_frame + 1)."""
        groups = -(-num_frames // self.frames_per_group)
        return groups * (self.tokens_per_frame + 1)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> VLMConfig:
        """The config of preset `name` (see PRESETS; case-insensitive), fields replaced by
        `overrides`: "tiny", "tiny-video" (tests, the embedded demo), "nvila-qwen2.5-1.5b",
        "nvila-qwen2.5-3b", "nvila-8b" (shapes of the published sizes). Unknown names raise
        ValueError listing the known ones."""
        key = name.lower()
        if key not in PRESETS:
            raise ValueError(f"unknown preset {name!r} for VLMConfig; known: {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[key](), **overrides)


def _tiny() -> VLMConfig:
    # 56 px / patch 14 -> 4x4 = 16 SigLIP tokens -> 4 projected tokens per frame.
    vision = SiglipConfig(
        hidden_size=32, num_layers=3, num_heads=2, mlp_dim=64, image_size=56, patch_size=14
    )
    return VLMConfig(
        vision=vision,
        llm=LLMConfig.preset("tiny"),
        frames_per_group=4,
        media_token_id=511,
        separator_token_id=10,
    )


def _nvila(llm_preset: str) -> Callable[[], VLMConfig]:
    # Shapes only: so400m-patch14-448 (1024 tokens -> 256 after 2x2) + a Qwen2.5 LLM. 198 is "\n"
    # in the Qwen2 tokenizer; the media id is the tokenizer's appended placeholder token and
    # depends on the checkpoint's tokenizer (`jaxstack.hf.load_nvila` reads it from there).
    def make() -> VLMConfig:
        return VLMConfig(
            vision=SiglipConfig.preset("so400m-patch14-448"),
            llm=LLMConfig.preset(llm_preset),
            frames_per_group=8,
            media_token_id=151649,
            separator_token_id=198,
        )

    return make


def _tiny_video() -> VLMConfig:
    # The embedded demo model (synthetic video QA, byte tokenizer): 56 px frames -> 4 tokens per
    # frame, groups of 4 frames, a 4-layer 128-wide LLM over the byte vocabulary (<= 512 ids).
    vision = SiglipConfig(
        hidden_size=64, num_layers=2, num_heads=4, mlp_dim=128, image_size=56, patch_size=14
    )
    llm = dataclasses.replace(
        LLMConfig.preset("tiny"),
        hidden_size=128,
        intermediate_size=384,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
    )
    return VLMConfig(
        vision=vision, llm=llm, frames_per_group=4, media_token_id=511, separator_token_id=10
    )


PRESETS: dict[str, Callable[[], VLMConfig]] = {
    "tiny": _tiny,
    "tiny-video": _tiny_video,
    "nvila-qwen2.5-1.5b": _nvila("qwen2.5-1.5b"),
    "nvila-qwen2.5-3b": _nvila("qwen2.5-3b"),
    "nvila-8b": _nvila("qwen2.5-7b"),
}


class NVILA(nnx.Module):
    """SigLIP tower + 2x2 projector + decoder LLM.

    dtype: compute dtype of all three parts; param_dtype: parameter storage dtype.
    """

    def __init__(
        self,
        cfg: VLMConfig,
        *,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        remat: str = "none",
        rngs: nnx.Rngs,
    ):
        self.cfg = cfg
        self.vision_tower = SiglipVisionTower(
            cfg.vision,
            select_layer=cfg.select_layer,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.projector = Projector2x2(
            cfg.vision.hidden_size,
            cfg.llm.hidden_size,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.llm = LLM(cfg.llm, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=rngs)

    def encode_images(self, pixels_nhwc: Array) -> Array:
        """pixels [N, H, W, 3] (NHWC) -> projected tokens [N, tokens_per_frame, D].

        With `cfg.freeze_vision` the tower output is wrapped in `stop_gradient`.
        """
        feats = self.vision_tower(pixels_nhwc)
        if self.cfg.freeze_vision:
            feats = jax.lax.stop_gradient(feats)
        return self.projector(tokens_to_map(feats))

    def separator_embedding(self) -> Array:
        """LLM embedding of `separator_token_id`, [1, D]."""
        ids = jnp.asarray([[self.cfg.separator_token_id]], jnp.int32)
        return self.llm.embed(ids)[0]

    def pool_video(self, frame_tokens_tnd: Array) -> Array:
        """Per-frame tokens [T, n, D] -> [G * (n + 1), D]: temporal pooling + separators."""
        pooled = temporal_pool(frame_tokens_tnd, self.cfg.frames_per_group)
        return interleave_separators(pooled, self.separator_embedding())

    def encode_video(self, frames_thwc: Array) -> Array:
        """frames [T, H, W, 3] -> video embeddings [G * (tokens_per_frame + 1), D].

        G = ceil(T / frames_per_group); a final partial group averages the frames it has.
        """
        return self.pool_video(self.encode_images(frames_thwc))

    def encode_videos(self, frames_bfhwc: Array) -> Array:
        """A batch of equal-length clips [B, F, H, W, 3] -> video embeddings [B, V, D].

        V = G * (tokens_per_frame + 1); all B * F frames go through the tower in one batch.
        """
        b, f = frames_bfhwc.shape[:2]
        tokens = self.encode_images(frames_bfhwc.reshape(b * f, *frames_bfhwc.shape[2:]))
        tokens = tokens.reshape(b, f, *tokens.shape[1:])
        pooled = jax.vmap(lambda x: temporal_pool(x, self.cfg.frames_per_group))(tokens)
        sep = self.separator_embedding()
        return jax.vmap(interleave_separators, in_axes=(0, None))(pooled, sep)

    def embed_prompt(self, input_ids_bt: Array, media_embeds_md: Array) -> Array:
        """input_ids int [B, L], media [M, D] (one row per placeholder) -> embeddings [B, L, D]."""
        text = self.llm.embed(input_ids_bt)
        return merge_multimodal(text, input_ids_bt, media_embeds_md, self.cfg.media_token_id)

    def __call__(self, input_ids_bt: Array, media_embeds_md: Array, **kwargs: Any) -> Array:
        """Logits [B, L, V]; extra keyword arguments go to `LLM.hidden_states`."""
        embeds = self.embed_prompt(input_ids_bt, media_embeds_md)
        return self.llm(inputs_embeds=embeds, **kwargs)


def init_nvila(cfg: VLMConfig, *, seed: int = 0, dtype: Any = jnp.float32) -> NVILA:
    """Randomly initialised NVILA (tests, benchmarks)."""
    return NVILA(cfg, dtype=dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(seed))


def trainable_filter(cfg: VLMConfig) -> nnx.filterlib.Filter:
    """Params to differentiate: all, or all but the vision tower when `cfg.freeze_vision`.

    Use with `nnx.grad(loss, argnums=nnx.DiffState(0, trainable_filter(cfg)))` so the frozen
    tower gets no gradient entries at all (`stop_gradient` alone gives zeros).
    """
    if cfg.freeze_vision:
        return nnx.All(nnx.Param, nnx.Not(nnx.PathContains("vision_tower")))
    return nnx.Param


DEFAULT_FRAME_AXES = ("data", "fsdp", "sequence")


def encode_video(
    model: NVILA,
    frames_thwc: Array,
    *,
    mesh: Mesh | None = None,
    axes: Sequence[str] | None = None,
) -> Array:
    """Video embeddings [G * (tokens_per_frame + 1), D], frames sharded over `mesh`.

    frames [T, H, W, 3]. Without a mesh this is `model.encode_video(frames)`. With a mesh, the
    frames are split along T over the mesh axes `axes` (default: "data", "fsdp", "sequence"
    flattened; the remaining axes, e.g. "tensor", hold replicas). T is zero-padded up to a
    multiple of the device count n = prod(mesh.shape[a] for a in axes); each device runs the
    vision tower + projector on its own T_pad / n frames inside `shard_map` (pixels are never
    gathered; parameters are passed replicated), the outputs of padded frames are dropped, and
    only the projected per-frame tokens [T, n_tok, D] are combined for temporal pooling and the
    separators. Equals the single-device result up to float rounding. Works eagerly and under
    `nnx.jit`; one model object used through `nnx.jit` with two different meshes fails
    (nnx.jit writes the parameters back placed for the first mesh): use one mesh per model, or
    call it functionally (`nnx.split` + `jax.jit`).
    """
    if mesh is None:
        return model.encode_video(frames_thwc)
    tokens = frame_tokens(
        model.vision_tower,
        model.projector,
        frames_thwc,
        mesh=mesh,
        axes=axes,
        freeze=model.cfg.freeze_vision,
    )
    return model.pool_video(tokens)


def frame_tokens(
    tower: SiglipVisionTower,
    projector: Projector2x2,
    frames_thwc: Array,
    *,
    mesh: Mesh | None = None,
    axes: Sequence[str] | None = None,
    freeze: bool = False,
) -> Array:
    """Projected per-frame tokens [T, tokens_per_frame, D], frames sharded over `mesh` as in
    `encode_video` (before temporal pooling and separators)."""
    if mesh is None:
        feats = tower(frames_thwc)
        feats = jax.lax.stop_gradient(feats) if freeze else feats
        return projector(tokens_to_map(feats))
    axes = tuple(DEFAULT_FRAME_AXES if axes is None else axes)
    unknown = [a for a in axes if a not in mesh.shape]
    if unknown:
        raise ValueError(f"axes {unknown} not in mesh axes {tuple(mesh.axis_names)}")
    n_dev = math.prod(mesh.shape[a] for a in axes)
    t = frames_thwc.shape[0]
    pad = (-t) % n_dev
    if pad:
        frames_thwc = jnp.pad(frames_thwc, ((0, pad),) + ((0, 0),) * (frames_thwc.ndim - 1))

    # Only the tower + projector travel into shard_map, replicated.
    graphdef, state = nnx.split((tower, projector))

    def local(state_local: nnx.State, frames_local: Array) -> Array:
        tower_l, projector_l = nnx.merge(graphdef, state_local)
        # per-device code: the axes are manual here, so the layers' `constrain` is a no-op
        feats = tower_l(frames_local)
        if freeze:
            feats = jax.lax.stop_gradient(feats)
        return projector_l(tokens_to_map(feats))

    frame_spec = P(axes)
    fn = shard_map(local, mesh, in_specs=(P(), frame_spec), out_specs=frame_spec)
    return fn(state, frames_thwc)[:t]


# -- multimodal sequence parallelism (LongVILA MM-SP) for one long-video prompt -------------------


@dataclasses.dataclass(frozen=True, eq=False)
class VideoSPPlan:
    """Static sharding of one video prompt over the `sequence` axis (see `plan_video_prompt`).

    mm: the token routing; its units are temporal-pooling groups (frames_per_group frames ->
        tokens_per_frame tokens), split over the devices at group boundaries.
    input_ids: int32 [S], the prompt's ids with each group's separator placeholder replaced by
        `separator_token_id` (separators are embedded like text on their storage device).
    frame_index: int32 [P * U, frames_per_group]: global frame (over the concatenated videos)
        of each frame slot of each device's group slots, -1 for padding.
    """

    mm: MMShardPlan
    input_ids: np.ndarray
    frame_index: np.ndarray


def plan_video_prompt(
    cfg: VLMConfig,
    input_ids: np.ndarray,
    frame_counts: Sequence[int],
    sp: int,
    *,
    layout: str = "contiguous",
    method: str = "all_to_all",
) -> VideoSPPlan:
    """Plan for a prompt whose placeholders hold `len(frame_counts)` videos, in order.

    input_ids: int [S] or [1, S] (host array); video v of frame_counts[v] frames fills
    `cfg.video_length(frame_counts[v])` consecutive placeholders (`media_token_id`), as
    `encode_video` output: per group tokens_per_frame tokens then one separator.
    """
    ids = np.asarray(input_ids).reshape(-1).astype(np.int32)
    n, k = cfg.tokens_per_frame, cfg.frames_per_group
    media = np.flatnonzero(ids == cfg.media_token_id)
    want = sum(cfg.video_length(f) for f in frame_counts)
    if media.size != want:
        raise ValueError(f"{media.size} media placeholders but the videos need {want}")
    is_sep = np.arange(media.size) % (n + 1) == n
    ids = ids.copy()
    ids[media[is_sep]] = cfg.separator_token_id
    visual = np.zeros(ids.shape[0], bool)
    visual[media[~is_sep]] = True
    groups = []  # global frame index lists, one per group
    first = 0
    for f in frame_counts:
        groups += [list(range(first + g, first + min(g + k, f))) for g in range(0, f, k)]
        first += f
    mm = plan_mm_sharding(visual, len(groups), n, sp, layout, method=method)
    frame_index = np.full((mm.device_units.size, k), -1, np.int32)
    for slot, g in enumerate(mm.unit_slots()):
        if g >= 0:
            frame_index[slot, : len(groups[g])] = groups[g]
    return VideoSPPlan(mm=mm, input_ids=ids, frame_index=frame_index)


def encode_video_groups_sp(
    model: NVILA, frames_thwc: Array, plan: VideoSPPlan, mesh: Mesh, *, axis: str = "sequence"
) -> Array:
    """Pooled group tokens [P * U, tokens_per_frame, D] in device-slot order, sharded over
    `axis`: device d runs the tower + projector only on the frames of its own groups (each
    frame once) and averages them per group, as `temporal_pool`.

    frames_thwc: [T, H, W, 3], all videos' frames concatenated. They are arranged into the
    plan's frame slots ([P * U * frames_per_group], padding repeats frame 0 and is masked out)
    and split over `axis`; with a multi-host loader each device would load only its slots.
    """
    k = plan.frame_index.shape[1]
    idx = plan.frame_index.reshape(-1)
    valid = jnp.asarray(idx >= 0)
    frames = jnp.take(frames_thwc, jnp.asarray(np.maximum(idx, 0)), axis=0)
    counts = jnp.asarray(np.maximum((plan.frame_index >= 0).sum(1), 1).astype(np.float32))
    graphdef, state = nnx.split((model.vision_tower, model.projector))
    freeze = model.cfg.freeze_vision

    def local(state_l, frames_l, valid_l, counts_l):
        tower_l, projector_l = nnx.merge(graphdef, state_l)
        feats = tower_l(frames_l)  # per-device code (manual axes: `constrain` is a no-op)
        if freeze:
            feats = jax.lax.stop_gradient(feats)
        tokens = projector_l(tokens_to_map(feats))  # [U * k, n, D]
        x32 = jnp.where(valid_l[:, None, None], tokens.astype(jnp.float32), 0.0)
        sums = x32.reshape(-1, k, *x32.shape[1:]).sum(axis=1)
        return (sums / counts_l[:, None, None]).astype(tokens.dtype)

    spec = P(axis)
    fn = shard_map(local, mesh, in_specs=(P(), spec, spec, spec), out_specs=spec)
    return fn(state, frames, valid, counts)


def video_prompt_logits_sp(
    model: NVILA, frames_thwc: Array, plan: VideoSPPlan, mesh: Mesh, *, axis: str = "sequence"
) -> tuple[Array, Array]:
    """Logits of one long-video prompt with multimodal sequence parallelism.

    Frames are encoded once, split over the `sequence` axis at group boundaries
    (`encode_video_groups_sp`); visual tokens move to their sequence shards by
    `shard_multimodal_embeddings`; the LLM runs with sequence-parallel attention (mode from
    `use_sequence_parallel`) on the [1, S_pad] sequence at the layout's global positions.
    Returns (logits [1, S_pad, V] in storage order, sharded over `axis`; positions int32
    [1, S_pad]). `plan.mm.from_layout(logits)` gives the [1, S, V] logits of the unsharded
    forward `model(input_ids, media)`. Needs the "contiguous" layout (the LLM's attention
    runs sequence parallelism in that layout).
    """
    if plan.mm.layout != "contiguous":
        raise ValueError("the LLM's sequence-parallel attention uses the contiguous layout")
    groups = encode_video_groups_sp(model, frames_thwc, plan, mesh, axis=axis)
    embeds, positions = shard_multimodal_embeddings(
        groups, plan.input_ids, model.llm.embed, plan.mm, mesh, axis=axis
    )
    with use_mesh(mesh):
        logits = model.llm(inputs_embeds=embeds, positions=positions)
    return logits, positions


def video_prompt_lm_loss(
    logits: Array, plan: VideoSPPlan, targets: Array, loss_mask: Array
) -> Array:
    """Mean cross-entropy over `loss_mask` of storage-order logits [1, S_pad, V].

    targets int [S], loss_mask [S] are in position order (as for the unsharded logits); they
    are moved to storage order by the plan (padding slots get weight 0).
    """
    tgt = plan.mm.to_layout(jnp.asarray(targets).reshape(-1))[None]
    w = plan.mm.to_layout(jnp.asarray(loss_mask).reshape(-1).astype(jnp.float32))[None]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)


def video_prompt_loss_sp(
    model: NVILA,
    frames_thwc: Array,
    plan: VideoSPPlan,
    targets: Array,
    loss_mask: Array,
    mesh: Mesh,
    *,
    axis: str = "sequence",
) -> Array:
    """`video_prompt_lm_loss` of `video_prompt_logits_sp` (targets, loss_mask [S], position
    order)."""
    logits, _ = video_prompt_logits_sp(model, frames_thwc, plan, mesh, axis=axis)
    return video_prompt_lm_loss(logits, plan, targets, loss_mask)


__all__ = [
    "NVILA",
    "PRESETS",
    "VLMConfig",
    "VideoSPPlan",
    "encode_video",
    "encode_video_groups_sp",
    "frame_tokens",
    "init_nvila",
    "plan_video_prompt",
    "trainable_filter",
    "video_prompt_lm_loss",
    "video_prompt_logits_sp",
    "video_prompt_loss_sp",
]
