"""``Sam3LoRAModule``: SAM 3 + adapters as a LightningModule.

One step: the vision encoder runs once per image of the batch, its features are expanded over that image's
prompt rows, the rest of SAM 3 runs once per row; the criterion matches and scores; Lightning steps the
optimiser over adapter parameters only. Earlier decoder layers' outputs (for auxiliary losses) are read with
forward hooks on ``dot_product_scoring`` and ``detr_decoder`` (per-layer logits and presence) and on
``detr_decoder.box_head`` (the per-layer box offsets ``Sam3Model.forward`` computes), so nothing is computed
twice. Each layer's boxes are ``sigmoid(inverse_sigmoid(decoder_reference_boxes[i]) + offsets[i])`` exactly as
HF (and the official SAM 3) build them: the reference boxes are not detached there, so a layer's box loss also
reaches the layer before it ("look forward twice"); the decoder's own refined boxes (its next layer's input)
are detached and would cut that path.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torchvision.ops import box_convert
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput, inverse_sigmoid

from sam3lora.adapter import CHECKPOINT_KEY, HPARAMS_KEY, check_checkpoint, checkpoint_record
from sam3lora.data.batch import Sam3Batch
from sam3lora.fingerprint import adapter_names, base_fingerprint, rename_adapter
from sam3lora.lora import LoraSettings, component_of, unwrap_base
from sam3lora.metrics import CgF1Accumulator, CocoApAccumulator, MatchedIoUDice
from sam3lora.model.dac import DAC_KWARG, dac_outputs, install_dac_hooks
from sam3lora.model.host_shapes import keep_spatial_shapes_on_host
from sam3lora.model.mask_product import MaskProduct
from sam3lora.model.materialised_masks import materialise_attention_masks
from sam3lora.perf import (
    CHECKPOINTABLE,
    PerfSettings,
    TextFeatureCache,
    VisionFeatureCache,
    base_autocast,
    check_deterministic,
    check_frozen,
    prepare_low_precision_base,
    set_activation_checkpointing,
)
from sam3lora.perf.compile import set_compile
from sam3lora.perf.feature_cache import transform_fingerprint
from sam3lora.perf.memory_plan import AUTO, Plan, checkpoint_for_batch
from sam3lora.perf.precision import cast_frozen_base
from sam3lora.sam3 import sam3_rows, sam3_scores
from sam3lora.training.schedule import ScheduleSettings


@dataclass
class MetricSettings:
    """``module.metrics`` of ``conf/module/default.yaml`` (the one place the values are stated).

    Attributes:
    score_threshold: predictions with sigmoid(logit) * sigmoid(presence) >= this count for cgF1 / IL_MCC / pmF1.
        ``val/iou`` and ``val/dice`` are not thresholded: they are the mask IoU / Dice of the query the criterion
        matched to each ground-truth instance (mask quality; calibration is what cgF1 measures).
    mask_threshold: mask probability above which a pixel is foreground.
    ap_every_n_epochs: COCO box/mask AP every N validation epochs (0 = never); every validation outside ``fit``.
    max_detections: detections per (image, prompt) row kept for AP: pycocotools' maxDets, which it applies per
        (image, category), i.e. per row (cgF1 always sees every query above ``score_threshold``).
    """

    score_threshold: float
    mask_threshold: float
    ap_every_n_epochs: int
    max_detections: int


def _fp32_roi_features_on_cpu(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Geometry-encoder pre-hook: under CPU bf16 autocast, hand it float32 features of the last level.

    HF casts bfloat16 features to float16 for ``roi_align``, and CPU autocast cannot handle float16 (the
    ``torch.cat`` inside ``roi_align`` raises "Unexpected floating ScalarType in at::autocast::prioritize"), so
    ``trainer.precision=bf16-mixed`` on the CPU would fail on every step. GPUs are unaffected and untouched.
    """
    feats = kwargs.get("img_feats")
    if feats is None or not torch.is_autocast_enabled("cpu") or feats[-1].dtype != torch.bfloat16:
        return None
    return args, {**kwargs, "img_feats": (*feats[:-1], feats[-1].float())}


class Sam3LoRAModule(L.LightningModule):
    """Train and validate a (PEFT-wrapped) ``Sam3Model``.

    Args:
        model: ``Sam3Model`` with adapters (``peft.PeftModel``); only parameters with ``requires_grad`` train.
        criterion: ``Sam3Criterion`` (or any module with ``match(outputs, targets)`` and
            ``forward(outputs, targets, indices) -> {"loss": ..., "<term>": ...}``); None: a module built only to
            load a checkpoint's weights (``load_from_checkpoint``), which cannot train.
        optimizer: factory ``params -> Optimizer`` (e.g. ``functools.partial(torch.optim.AdamW, lr=...)``); None as
            for ``criterion``.
        scheduler: schedule settings; sized from ``trainer.estimated_stepping_batches``.
        metrics: validation metric settings.
        component_lr: optional learning rate per component (``vision_encoder``, ``detr_decoder``, ...); None: one.
        perf: speed/memory switches (activation checkpointing, vision/text feature caches).
        lora_settings: the LoRA settings, recorded beside exported adapters.

    The settings (each a dataclass, or a mapping of its fields) are the module's hyperparameters
    (``save_hyperparameters``, plain types): a checkpoint carries them, and
    ``Sam3LoRAModule.load_from_checkpoint(path, model=..., criterion=..., optimizer=...)`` rebuilds the module from
    it, running the same ``on_load_checkpoint`` checks as a resume. ``model``, ``criterion`` and ``optimizer`` are
    built objects and are passed again.

    ``sam3lora.config.defaults("module/default.<key>")`` builds the shipped scheduler, metrics and perf settings.

    A base loaded in bfloat16/float16 (``model.dtype``) keeps float32 trainable weights and runs under autocast
    to the base dtype when the trainer's precision does not already autocast.
    """

    def __init__(
        self,
        model: nn.Module,
        criterion: nn.Module | None,
        optimizer: Callable[..., torch.optim.Optimizer] | None,
        scheduler: ScheduleSettings | Mapping[str, Any],
        metrics: MetricSettings | Mapping[str, Any],
        component_lr: Mapping[str, float] | None,
        perf: PerfSettings | Mapping[str, Any],
        lora_settings: LoraSettings | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        scheduler, metrics = _settings(ScheduleSettings, scheduler), _settings(MetricSettings, metrics)
        perf, lora_settings = _settings(PerfSettings, perf), _settings(LoraSettings, lora_settings)
        self.save_hyperparameters(
            {"scheduler": asdict(scheduler), "metrics": asdict(metrics), "component_lr": dict(component_lr or {}),
             "perf": asdict(perf), "lora_settings": None if lora_settings is None else asdict(lora_settings)},
            logger=False,
        )
        self.model = model
        self.criterion = criterion
        self.optimizer_factory = optimizer
        self.schedule = scheduler
        self.metric_settings = metrics
        self.component_lr = dict(component_lr or {})
        self.lora_settings = lora_settings
        self.strict_loading = False  # checkpoints hold trainable weights only; on_load_checkpoint verifies them
        self._captured: dict[str, Any] = {}
        base = self.base_model
        self._hooks = [
            base.get_submodule("dot_product_scoring").register_forward_hook(self._capture("layer_logits")),
            base.get_submodule("detr_decoder").register_forward_hook(self._capture("decoder")),
            # called once per layer inside the decoder, then on all layers by Sam3Model.forward: the last call wins
            base.get_submodule("detr_decoder.box_head").register_forward_hook(self._capture("box_offsets")),
            # training: the masks stay a product of these two, evaluated for the matched queries (MaskProduct)
            base.get_submodule("mask_decoder.instance_projection").register_forward_hook(
                self._capture("instance_embeds")),
            base.get_submodule("mask_decoder.mask_embedder").register_forward_hook(self._defer_masks),
        ]
        base.get_submodule("geometry_encoder").register_forward_pre_hook(_fp32_roi_features_on_cpu, with_kwargs=True)
        keep_spatial_shapes_on_host(base)  # no .item() per decoder layer (sam3lora.model.host_shapes)
        self._dac_ready = False
        if self.use_dac:
            self._prepare_dac()  # a model that cannot run the DAC queries fails at build time
        self._checked_unused = False
        self.iou_dice = MatchedIoUDice(score_threshold=0.0)  # every matched query counts (see MetricSettings)
        self.cgf1 = CgF1Accumulator(metrics.score_threshold)
        self.coco_ap = CocoApAccumulator(max_dets=metrics.max_detections)
        self._check_component_lr()  # a typo fails at build time, not after a validation pass
        if optimizer is not None:
            self._check_optimizer()
        self._low_precision = prepare_low_precision_base(self.model)  # None for a float32 base
        self.vision_cache: VisionFeatureCache | None = None
        self.text_cache: TextFeatureCache | None = None
        self.configure_perf(perf)

    def configure_perf(self, perf: PerfSettings | Mapping[str, Any]) -> None:
        """Apply ``perf``: activation checkpointing on the chosen encoders (off on the others), fresh caches.

        Raises ``FeatureCacheError`` when a cache is asked for an encoder that trains (or has active dropout).
        """
        perf = _settings(PerfSettings, perf)
        set_activation_checkpointing(self.model, CHECKPOINTABLE, enabled=False)
        if perf.checkpoint_components:
            set_activation_checkpointing(self.model, perf.checkpoint_components)
        self.checkpoint_plan: Plan | None = None  # activation_checkpointing: auto, planned on the first batch
        if perf.base_dtype is not None:
            cast_frozen_base(self.model, perf.base_dtype)
            self._low_precision = prepare_low_precision_base(self.model)
        self.vision_cache = None
        if perf.cache_vision_features:
            check_frozen(self.model, "vision_encoder", "module.perf.cache_vision_features")
            base_key = json.dumps(base_fingerprint(self.model), sort_keys=True)
            self.vision_cache = VisionFeatureCache(
                perf.cache_vision_features, perf.vision_cache_dir, perf.cache_dtype, base_key=base_key
            )
        self.text_cache = None
        if perf.cache_text_features:
            check_frozen(self.model, "text_encoder", "module.perf.cache_text_features")
            self.text_cache = TextFeatureCache()
        set_compile(self.model, self.criterion, perf.compile_options)
        materialise_attention_masks(self.base_model)  # no padding_mask.all() per mask (model.materialised_masks)
        self.perf = perf

    def setup(self, stage: str) -> None:
        """With a vision cache: refuse random training transforms and namespace the cache by data and transforms."""
        if self.vision_cache is None:
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        if stage == "fit":
            check_deterministic(datamodule)
        for split in ("train", "val"):
            self.vision_cache.set_namespace(split, transform_fingerprint(datamodule, split))

    @property
    def base_model(self) -> nn.Module:
        return unwrap_base(self.model)

    @property
    def use_dac(self) -> bool:
        """Whether training steps run the one-to-many (DAC) queries: the criterion's ``loss.o2m.enabled``."""
        return bool(getattr(self.criterion, "wants_o2m", False))

    def _prepare_dac(self) -> None:
        """Hooks (once): the decoder's inputs feed the DAC copy (with the captured pixel embeddings)."""
        if self._dac_ready:
            return
        base = self.base_model
        install_dac_hooks(base)
        self._hooks += [
            base.get_submodule("detr_decoder").register_forward_pre_hook(self._keep_decoder_inputs, with_kwargs=True),
        ]
        self._dac_ready = True

    def _keep_decoder_inputs(self, _module: nn.Module, _args: tuple, kwargs: dict[str, Any]) -> None:
        if not kwargs.get(DAC_KWARG):
            self._captured["decoder_inputs"] = kwargs

    def _defer_masks(self, module: nn.Module, _inputs: Any, output: Tensor) -> Tensor | None:
        """Forward hook on ``mask_decoder.mask_embedder``: in training, keep its (R,Q,C) output for a
        ``MaskProduct`` and hand the decoder no queries, so it forms no (R,Q,h,w) logits. The same in a
        checkpoint's recomputation (the module is still training), so the replay has the same shapes."""
        if not module.training:
            return None
        self._captured["mask_embeddings"] = output
        return output[:, :0]

    def _capture(self, key: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            self._captured[key] = output

        return hook

    # ------------------------------------------------------------------------------------------- forward
    def forward(self, batch: Sam3Batch) -> dict[str, Any]:
        """Model outputs in the criterion's format (``docs/contracts.md``) for the R rows of ``batch``.

        Returns ``pred_logits (R,Q)``, ``pred_boxes (R,Q,4)`` xyxy, ``presence_logits (R,1)``,
        ``pred_masks (R,Q,h,w)`` (in training a ``MaskProduct``: formed where the loss indexes it),
        ``semantic_seg (R,1,h,w)``, ``aux_outputs`` (one dict per earlier layer) and, in training with one-to-many
        supervision, ``o2m`` (the DAC queries' outputs, ``sam3lora.model.dac``).
        """
        with base_autocast(self._low_precision, batch.pixel_values.device):
            return self._forward(batch)

    def _cached_vision(self, batch: Sam3Batch) -> Sam3VisionEncoderOutput | None:
        """Features of the I images (``fpn_*`` tuples of (I,C,h,w)) from the vision cache; None without a cache
        (``sam3_rows`` then runs the vision encoder)."""
        if self.vision_cache is None:
            return None
        stage = "train" if self.training else "val"
        return self.vision_cache.features(self.model, batch.pixel_values, batch.image_ids, stage)

    def _cached_text(self, batch: Sam3Batch) -> BaseModelOutputWithPooling | None:
        """``text_embeds`` for Sam3Model built from cached text-encoder outputs (R,32,D); None without a cache."""
        if self.text_cache is None:
            return None
        base = self.base_model
        hidden = self.text_cache(base.text_encoder, batch.input_ids, batch.attention_mask, batch.prompts)
        # as Sam3Model.get_text_features: the projection of the last hidden state (it may be trained, so not cached)
        embeds = BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=base.text_projection(hidden))
        return embeds

    def _forward(self, batch: Sam3Batch) -> dict[str, Any]:
        dac = self.use_dac and self.training  # the DAC copy exists in training steps only, as in the official model
        if dac:
            self._prepare_dac()
        vision = self._cached_vision(batch)
        self._captured.clear()
        # the contract's forward (as prediction runs it): vision once per image, indexed per row
        out = sam3_rows(self.model, batch.model_inputs(), vision=vision, text_embeds=self._cached_text(batch))
        layer_logits = self._captured["layer_logits"].squeeze(-1)  # (L,R,Q)
        layer_presence = self._captured["decoder"].presence_logits  # (L,R,1)
        offsets = self._captured["box_offsets"]  # (L,R,Q,4): box_head on every layer's hidden states
        if offsets.ndim != 4 or offsets.shape[0] != layer_logits.shape[0]:
            raise RuntimeError(f"detr_decoder.box_head: expected offsets (L,R,Q,4), got {tuple(offsets.shape)}")
        # (L,R,Q,4) cxcywh: each layer's input reference boxes (with grad, as Sam3Model.forward uses them)
        references = out.decoder_reference_boxes
        aux = [
            {
                "pred_logits": layer_logits[i],
                "pred_boxes": box_convert((inverse_sigmoid(references[i]) + offsets[i]).sigmoid(), "cxcywh", "xyxy"),
                "presence_logits": layer_presence[i],
            }
            for i in range(layer_logits.shape[0] - 1)
        ]
        outputs = {
            "pred_logits": out.pred_logits,
            "pred_boxes": out.pred_boxes,
            "presence_logits": out.presence_logits,
            "pred_masks": self._pred_masks(out.pred_masks),
            "semantic_seg": out.semantic_seg,
            "aux_outputs": aux,
        }
        if dac:
            outputs["o2m"] = dac_outputs(
                self.base_model, self._captured["decoder_inputs"], self._captured["instance_embeds"]
            )
        return outputs

    def _pred_masks(self, dense: Tensor) -> Tensor | MaskProduct:
        """The decoder's (R,Q,h,w) logits, or in training the ``MaskProduct`` the hooks captured."""
        embeddings = self._captured.get("mask_embeddings")
        if embeddings is None:
            return dense
        if dense.shape[1] != 0:
            raise RuntimeError(f"mask_decoder: expected no dense masks in training, got {tuple(dense.shape)}")
        return MaskProduct(embeddings, self._captured["instance_embeds"])

    # ------------------------------------------------------------------------------------------- training
    def training_step(self, batch: Sam3Batch, batch_idx: int) -> Tensor:
        if self.perf.activation_checkpointing == AUTO and self.checkpoint_plan is None:
            self.checkpoint_plan = checkpoint_for_batch(self.model, batch, self.perf.memory_budget_gb,
                                                        self._low_precision)
            rank_zero_info(self.checkpoint_plan.describe())
        outputs = self(batch)
        losses = self.criterion(outputs, batch.targets)
        rows = batch.num_rows
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=rows)
        self.log_dict({f"train/{k}": v for k, v in losses.items() if k != "loss"}, batch_size=rows)
        return losses["loss"]

    def on_after_backward(self) -> None:
        if self._checked_unused:
            return
        self._checked_unused = True
        unused = [n for n, p in self.named_parameters() if p.requires_grad and p.grad is None]
        if not unused:
            return
        message = (
            f"{len(unused)} trainable parameter(s) got no gradient in the first step, e.g. {unused[:3]}: they "
            "sit in modules this forward does not use. Remove them from the LoRA preset / modules_to_save"
        )
        if self.trainer.world_size > 1:
            raise RuntimeError(message + " (DDP needs every trainable parameter used, or find_unused_parameters)")
        warnings.warn(message, stacklevel=1)

    # ------------------------------------------------------------------------------------------- validation
    def _ap_this_epoch(self) -> bool:
        n = self.metric_settings.ap_every_n_epochs
        if n <= 0:
            return False
        if self.trainer.state.fn != "fit":
            return True
        return (self.current_epoch + 1) % n == 0

    def on_validation_epoch_start(self) -> None:
        self.iou_dice.reset()
        self.cgf1.reset()
        self.coco_ap.reset()

    def validation_step(self, batch: Sam3Batch, batch_idx: int) -> dict[str, Any] | None:
        """Loss and metric updates; returns the first batch's outputs (for the prediction plots)."""
        if batch.num_rows == 0:  # every image of the batch was a bad sample (on_bad_sample: skip)
            # Log with weight 0 all the same: under DDP every rank must log the same keys, since val/loss is
            # reduced across ranks at the end of the epoch (a rank whose batches were all empty would hang it).
            self.log("val/loss", torch.zeros((), device=self.device), batch_size=0, sync_dist=True)
            return None
        outputs = self(batch)
        indices = self.criterion.match(outputs, batch.targets)
        losses = self.criterion(outputs, batch.targets, indices=indices)
        self.log("val/loss", losses["loss"], batch_size=batch.num_rows, sync_dist=True)
        self.update_metrics(batch, outputs, indices, with_ap=self._ap_this_epoch())
        return outputs if batch_idx == 0 else None

    @torch.no_grad()
    def update_metrics(
        self, batch: Sam3Batch, outputs: Mapping[str, Any], indices: list[tuple[Tensor, Tensor]], with_ap: bool
    ) -> None:
        """Feed every row to the metric accumulators, masks compared at the batch's S x S resolution."""
        settings = self.metric_settings
        scores = sam3_scores(outputs["pred_logits"], outputs["presence_logits"])  # (R,Q)
        size = batch.pixel_values.shape[-2:]
        mask_logit = torch.logit(torch.tensor(settings.mask_threshold)).item()
        for r, target in enumerate(batch.targets):
            q_matched = indices[r][0].to(scores.device)
            top = scores[r].topk(min(settings.max_detections, scores.shape[1])).indices
            above = torch.nonzero(scores[r] >= settings.score_threshold).flatten()  # cgF1 sees all of them
            candidates = torch.unique(torch.cat([q_matched, top, above]))
            position = torch.full((scores.shape[1],), -1, dtype=torch.long, device=scores.device)
            position[candidates] = torch.arange(len(candidates), device=scores.device)
            masks = F.interpolate(outputs["pred_masks"][r, candidates][None].float(), size=size, mode="bilinear")
            masks = masks[0] > mask_logit  # (C,S,S)
            cand_scores = scores[r, candidates]
            gt_masks = target["masks"].bool()
            has_mask = target["has_mask"].bool()
            self.iou_dice.update(
                masks, cand_scores, gt_masks, indices=(position[q_matched], indices[r][1]), gt_valid=has_mask
            )
            self.cgf1.update(masks, cand_scores, gt_masks[has_mask])
            if with_ap:
                height, width = int(size[0]), int(size[1])
                scale = torch.tensor([width, height, width, height], device=scores.device)
                self.coco_ap.update(
                    image_id=int(batch.image_ids[batch.image_index[r]]),
                    category_id=int(batch.category_ids[r]),
                    image_size=(height, width),
                    pred_scores=scores[r, top],
                    pred_boxes=outputs["pred_boxes"][r, top] * scale,
                    pred_masks=masks[position[top]],
                    gt_boxes=target["boxes"] * scale,
                    gt_masks=gt_masks,
                    gt_has_mask=has_mask,
                )

    def on_validation_epoch_end(self) -> None:
        iou = self.iou_dice.compute()  # torchmetrics sums the states over DDP processes
        cg = self.cgf1.compute()
        metrics = {"val/iou": iou["iou"], "val/dice": iou["dice"]}
        metrics.update({f"val/{k}": v for k, v in cg.items()})
        if self.coco_ap.dets or self.coco_ap.gts:
            self.coco_ap.all_gather()
            ap = self.coco_ap.compute()
            metrics.update({f"val/{k}": v for k, v in ap.items()})
        self.log("val/iou", metrics.pop("val/iou"), prog_bar=True)
        self.log_dict(metrics)

    # ------------------------------------------------------------------------------------------- optimiser
    def param_groups(self) -> list[dict[str, Any]]:
        """Trainable parameters grouped by (component learning rate, weight decay on/off).

        Biases, norms and other 1-D parameters (DoRA magnitudes) get weight decay 0.
        """
        self._check_component_lr()
        groups: dict[tuple[float | None, bool], list[nn.Parameter]] = {}
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            lr = self.component_lr.get(component_of(name))
            no_decay = param.ndim < 2 or name.endswith(".bias") or "norm" in name
            groups.setdefault((lr, no_decay), []).append(param)
        result = []
        for (lr, no_decay), params in groups.items():
            group: dict[str, Any] = {"params": params}
            if lr is not None:
                group["lr"] = lr
            if no_decay:
                group["weight_decay"] = 0.0
            result.append(group)
        return result

    def _check_component_lr(self) -> None:
        known = {component_of(n) for n, _ in self.model.named_parameters()}
        unknown = set(self.component_lr) - known
        if unknown:
            raise ValueError(f"module.component_lr: unknown component(s) {sorted(unknown)}; known: {sorted(known)}")

    def _check_optimizer(self) -> None:
        """Build the optimiser once over a dummy parameter: a bad argument (lr: abc) fails now, naming the key."""
        try:
            self.optimizer_factory([nn.Parameter(torch.zeros(1))])
        except (TypeError, ValueError) as err:
            raise ValueError(f"module.optimizer: {err}") from err

    def unhook(self) -> nn.Module:
        """Remove the hooks that feed this module's losses from ``model`` (they keep each forward's outputs alive) and
        return it: for a model that lives on without the module, e.g. after ``load_from_checkpoint``. Hooks that do
        not change outputs (host shapes, DAC self-attention, CPU roi features) stay."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self._captured.clear()
        return self.model

    def configure_optimizers(self) -> dict[str, Any]:
        if self.optimizer_factory is None:
            raise ValueError("Sam3LoRAModule was built without an optimizer (optimizer=None): it cannot train")
        optimizer = self.optimizer_factory(self.param_groups())
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        scheduler = self.schedule.build(optimizer, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------------------------------- checkpoints
    def trainable_names(self) -> set[str]:
        return {n for n, p in self.named_parameters() if p.requires_grad}

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``; without ``strict`` (checkpoints hold the trainable weights only) the frozen
        weights a checkpoint leaves out by design are not reported missing: only trainable ones would be."""
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if not strict:
            trainable = self.trainable_names()
            result.missing_keys[:] = [key for key in result.missing_keys if key in trainable]
        return result

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only trainable weights (megabytes, not the gigabytes of the frozen base) plus the base identity and
        the manifest of those weights (``sam3lora.adapter.checkpoint_record``; the settings are the hyperparameters
        Lightning saves)."""
        keep = self.trainable_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint[CHECKPOINT_KEY] = checkpoint_record(self.model, keep)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint made on another base, or one whose weights are not exactly this model's trainable
        ones (``sam3lora.adapter.check_checkpoint``), in a resume and in ``load_from_checkpoint``.

        The checkpoint's adapter is restored into this model's active adapter: a checkpoint saved as ``default``
        loads as adapter ``name`` when ``model`` is a ``PeftModel`` whose active (trainable) adapter is ``name``.
        """
        source = (getattr(self._trainer, "ckpt_path", None)  # the file, in a resume
                  or (checkpoint.get(HPARAMS_KEY) or {}).get(SOURCE_KWARG) or "checkpoint")
        active = getattr(self.model, "active_adapter", None)
        saved = adapter_names(checkpoint["state_dict"])
        if isinstance(active, str) and len(saved) == 1 and saved != {active}:
            renamed = rename_adapter(checkpoint["state_dict"], saved.pop(), active)
            checkpoint["state_dict"] = {renamed[k]: v for k, v in checkpoint["state_dict"].items()}
        check_checkpoint(self.model, checkpoint, self.trainable_names(), source=source)


SOURCE_KWARG = "checkpoint_source"
"""``Sam3LoRAModule.load_from_checkpoint(path, ..., checkpoint_source=path)`` names the file in its errors (Lightning
hands extra keyword arguments to ``on_load_checkpoint`` among the hyperparameters, not to ``__init__``)."""


def _settings(cls: type, value: Any) -> Any:
    """``value`` as the dataclass ``cls``: a mapping (a checkpoint's hyperparameters, a Hydra node) of its fields is
    built into one; an instance (or None) is returned as is."""
    if isinstance(value, DictConfig):  # hydra.utils.instantiate turns a dataclass kwarg into a config
        value = OmegaConf.to_container(value, resolve=True)
    return cls(**value) if isinstance(value, Mapping) else value
