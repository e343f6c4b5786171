"""The MDETR module: backbone + transformer + heads (boxes, soft tokens, contrastive alignment, QA).

Outputs (B images, Q object queries, L text tokens, N decoder layers):
    pred_logits [B, Q, 256]   soft-token logits: 255 token positions + no-object (index 255)
    pred_boxes  [B, Q, 4]     (cx, cy, w, h) in [0, 1], relative to each image's unpadded size
    proj_queries [B, Q, 64]   L2-normalized projection of the decoder outputs (absent when contrastive_align_dim=0)
    proj_tokens [B, L, 64]    L2-normalized projection of the ENCODER outputs at text positions (padding included;
                              absent when contrastive_align_dim=0)
    tokenized                 the captions' BatchEncoding
    aux_outputs               N - 1 dicts (layers 0 .. N-2) with the (two or) four tensors above
    QA (clevr): pred_answer_type [B, 3], pred_answer_binary [B], pred_answer_reg [B, 20], pred_answer_attr [B, A]
    QA (gqa): pred_answer_type [B, 5], pred_answer_obj [B, 3], pred_answer_rel [B, 1594], pred_answer_attr
        [B, 403], pred_answer_cat [B, 678], pred_answer_global [B, 111]
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PretrainedConfig

from .backbone import Joiner, build_backbone
from .transformer import Transformer, unpadded_cells

# QA heads in slot order (the extra queries after the object queries): (name, output size, MLP?)
QA_HEADS: Dict[str, List[Tuple[str, int, bool]]] = {
    "gqa": [("type", 5, False), ("obj", 3, False), ("rel", 1594, False), ("attr", 403, False), ("cat", 678, False),
            ("global", 111, False)],
    "clevr": [("type", 3, False), ("binary", 1, False), ("reg", 20, True), ("attr", 15, False)],
}


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between them (reference name ``layers``)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class TokenSimilarityHead(nn.Module):
    """Soft-token logits as similarities (not in MDETR; GLIP / Grounding-DINO style): the logit of caption token l
    for a query is the scaled dot product of the projected query and the projected cross-encoder output at l; the
    no-object logit comes from the query alone. Slots after the caption (and text padding) get ``FILL``.

    MDETR's ``class_embed`` is ``Linear(d, 256)``: slot l is a fixed direction of the query, so the decoder must
    learn to write *where in the caption* its words are. Here a query only has to resemble its words' features,
    which a short run learns far sooner (see the README). hs [N, B, Q, d], text [L, B, d], text padding mask
    [B, L] (True = pad) -> logits [N, B, Q, num_classes + 1]."""

    FILL = -1e4  # finite: the soft-token loss multiplies log-probabilities by zero targets there

    def __init__(self, d_model: int, num_classes: int = 255):
        super().__init__()
        self.num_classes = num_classes
        self.query = nn.Linear(d_model, d_model)
        self.token = nn.Linear(d_model, d_model)
        self.no_object = nn.Linear(d_model, 1)

    def forward(self, hs: Tensor, text_memory: Tensor, text_padding_mask: Tensor) -> Tensor:
        length = text_memory.shape[0]
        if length > self.num_classes:
            raise ValueError(f"captions have {length} tokens, more than the {self.num_classes} token slots")
        tokens = self.token(text_memory).transpose(0, 1)  # [B, L, d]
        logits = torch.einsum("nbqd,bld->nbql", self.query(hs), tokens) * tokens.shape[-1] ** -0.5
        logits = logits.masked_fill(text_padding_mask[None, :, None, :], self.FILL)
        after = logits.new_full((*logits.shape[:-1], self.num_classes - length), self.FILL)
        return torch.cat([logits, after, self.no_object(hs).to(logits.dtype)], -1)


def sample_feature_map(feature_map: Tensor, points: Tensor, valid: Tensor) -> Tensor:
    """Bilinear samples of a padded feature map at points given relative to each image's unpadded region.

    feature_map [B, d, h, w] (padding bottom/right), points [B, P, 2] as (x, y) in [0, 1] of the unpadded region,
    valid [B, 2] its size in cells (width, height) -> [B, P, d] in the feature map's dtype (sampled in float32 or
    wider). The points are clamped between the centres of the first and last unpadded cells, so that no sample
    reads padding (the same numbers as for the image alone)."""
    h, w = feature_map.shape[-2:]
    dtype = torch.promote_types(torch.float32, feature_map.dtype)
    cells = torch.minimum((points.to(dtype) * valid[:, None]).clamp(min=0.5), valid[:, None] - 0.5)
    sample_at = cells / valid.new_tensor([w, h]) * 2 - 1  # grid_sample's [-1, 1] (align_corners=False)
    values = F.grid_sample(feature_map.to(dtype), sample_at[:, :, None].to(dtype), align_corners=False)
    return values[..., 0].transpose(1, 2).to(feature_map.dtype)  # [B, d, P, 1] -> [B, P, d]


def member_count_distribution(member_prob: Tensor, classes: int) -> Tensor:
    """The distribution of the number of members among independent queries (Poisson-binomial), exactly.

    member_prob [B, Q] (each query's probability of being a member, in [0, 1]) -> [B, classes] in float64: P(count
    = k) for k < classes - 1, and the last column P(count >= classes - 1). Pairs of partial distributions are
    convolved in ceil(log2 Q) rounds; float64 keeps probabilities down to ~1e-300, where float32 would flush a
    far-off count (100 queries at 0.3: P(count = 0) = 3e-16) to zero and its gradient with it."""
    if classes < 2:
        raise ValueError(f"classes must be at least 2 (counts 0 and 1+), got {classes}")
    prob = member_prob.double()
    batch, queries = prob.shape
    one_query = F.pad(torch.stack([1 - prob, prob], -1), (0, classes - 2))  # [B, Q, classes]
    rounds = max(queries - 1, 0).bit_length()
    none = F.one_hot(prob.new_zeros(batch, (1 << rounds) - queries, dtype=torch.long), classes).to(prob.dtype)
    dist = torch.cat([one_query, none], 1)  # padded to a power of two with certain non-members
    # counts i and j -> min(i + j, classes - 1), as a [classes * classes, classes] 0/1 matrix
    counts = torch.arange(classes, device=prob.device)
    total = (counts[:, None] + counts[None]).clamp(max=classes - 1)
    combine = F.one_hot(total.flatten(), classes).to(prob.dtype)
    for _ in range(rounds):
        pairs = dist[:, 0::2, :, None] * dist[:, 1::2, None, :]  # [B, n / 2, classes, classes]
        dist = pairs.flatten(-2) @ combine
    return dist[:, 0]


def box_grid_points(boxes: Tensor, size: int, scale: float) -> Tensor:
    """A size x size grid of cell centres over each box enlarged ``scale`` times: boxes [B, Q, 4] (cx, cy, w, h,
    relative) -> points [B, Q * size * size, 2] (x, y), row-major within each box."""
    steps = (torch.arange(size, device=boxes.device, dtype=boxes.dtype) + 0.5) / size - 0.5  # [-0.5, 0.5)
    gy, gx = torch.meshgrid(steps, steps, indexing="ij")
    offsets = torch.stack([gx.flatten(), gy.flatten()], -1)  # [S, 2]
    points = boxes[..., None, :2] + offsets * boxes[..., None, 2:] * scale  # [B, Q, S, 2]
    return points.flatten(1, 2)


def box_location(boxes: Tensor) -> Tensor:
    """MAttNet's location vector of each box: boxes [..., 4] (cx, cy, w, h, relative to the image) -> [..., 5]
    (x0, y0, x1, y1, w * h), all relative to the image."""
    centre, size = boxes[..., :2], boxes[..., 2:]
    return torch.cat([centre - size / 2, centre + size / 2, size.prod(-1, keepdim=True)], -1)


class BoxRoIRefiner(nn.Module):
    """A second look at each query's box (``box_roi``; not in MDETR; the RoIAlign stage of two-stage detectors):
    features sampled on a grid over the box, enlarged so that its edges are inside, and (``pixels``) the image's
    own pixels on a finer grid, give an offset to the box in logit space. The last Linear starts at zero: a
    fine-tune from a checkpoint without it starts from that checkpoint's boxes."""

    SCALE = 1.5

    def __init__(self, d_model: int, pixels: bool, feature_grid: int = 5, pixel_grid: int = 12, reduced: int = 32):
        super().__init__()
        self.feature_grid, self.pixel_grid = feature_grid, (pixel_grid if pixels else 0)
        self.reduce = nn.Linear(d_model, reduced)
        inputs = feature_grid ** 2 * reduced + 3 * self.pixel_grid ** 2
        self.local = nn.Linear(inputs, d_model)
        self.mlp = MLP(2 * d_model, d_model, 4, 2)
        nn.init.zeros_(self.mlp.layers[-1].weight)
        nn.init.zeros_(self.mlp.layers[-1].bias)

    def forward(self, hs: Tensor, boxes: Tensor, features: Tensor, valid: Tensor, images: Optional[Tensor],
                image_valid: Optional[Tensor]) -> Tensor:
        """hs [B, Q, d], boxes [B, Q, 4] (cxcywh, relative), projected features [B, d, h, w] with their unpadded
        size in cells [B, 2], images [B, 3, H, W] with theirs in pixels -> refined boxes [B, Q, 4]."""
        batch, queries = boxes.shape[:2]
        where = boxes.detach()
        reduced = self.reduce(features.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # [B, r, h, w]
        local = [sample_feature_map(reduced, box_grid_points(where, self.feature_grid, self.SCALE), valid)
                 .reshape(batch, queries, -1)]
        if self.pixel_grid:
            points = box_grid_points(where, self.pixel_grid, self.SCALE)
            local.append(sample_feature_map(images, points, image_valid).to(hs.dtype).reshape(batch, queries, -1))
        local = F.relu(self.local(torch.cat(local, -1)))
        offsets = self.mlp(torch.cat([hs, local], -1))
        return (torch.logit(boxes, eps=1e-5) + offsets).sigmoid()


class ObjectQAReadout(nn.Module):
    """CLEVR answers read from the object queries' detections (``qa_readout="objects"``; not in MDETR).

    A question's annotated boxes are taken as its members: all objects an existence or count question describes, or
    the one object an attribute question asks about (true of the shapes world; MDETR's CLEVR files may also box the
    objects that a question's relations refer to, so there this option is untested). The detection losses teach
    each object query to score how likely it is one of them, ``w_q = 1 - p_q(no object)``, but they weigh the
    no-object target of unmatched queries by ``no_object_weight`` c (the loss's ``eos_coef``, MDETR's 0.1), so at
    their optimum a query that is a member with probability p scores w = p / (p + c (1 - p)): 0.71 for p = 0.2 and
    c = 0.1. The readout undoes that weighting, p = sigmoid(logit(w) + ``member_offset``), a learned scalar starting
    at log(c) (without it the summed member scores exceeded the true count by 2-3 on the shapes world's val
    questions). It turns those member probabilities into answer logits that are added to the QA slot heads' own:
    - existence and count: the exact distribution of the number of members, taking the queries as independent
      (``member_count_distribution``): the binary logit gets log P(count > 0) - log P(count = 0), the count
      logits get log P(count = k). No parameters.
    - attribute: the answer distribution of the question's one referent, sum_q P(q is it) P(answer | q), as log
      probabilities. P(answer | q) is a softmax over a Linear of the query's decoder output joined with the
      projected backbone features at its box centre. The cross encoder keeps little of an object's colour: linear
      probes on the shapes world read colour from the backbone features at the box centre (0.94 of held-out
      questions) far better than from the decoder output (0.36). P(q is it) is p ** s, normalized over the
      queries: s = exp(10 ``sharpness``) starts at 1 and is learned (the 10 lets Adam move it within a
      fine-tune), so the choice can narrow to the likeliest member when several score high. (One Linear over
      the members' mean features, the first version, mixed two objects' features where the member scores split.)
    The QA losses so reach the detection head: they sharpen its member scores where the detection losses (with
    their 0.1 weight on "no object") leave them loose. They reach it at ``DETECTOR_GRAD`` times their size: from
    a pre-trained detector, whose loose scores put a question's count far off at first, the count loss's gradient
    had 2-4x the norm of all detection losses together (138-318 against 71-135 on the shapes world), and under
    MDETR's global gradient clipping it slowed every other head (the fresh answer-type head took 3x the steps).
    The attribute Linear starts at zero (a uniform P(answer | q), a constant term), so the answers start as the
    count distribution and the slot heads. All of it runs in float32 or wider, also under autocast."""

    EPS = 1e-6  # member probabilities are clamped to [EPS, 1 - EPS]
    TINY = 1e-300  # floor of a float64 probability before its log
    DETECTOR_GRAD = 0.1
    SHARPNESS_RATE = 10.0  # Adam moves a scalar by ~lr per step; this lets the referent exponent move 10x faster

    def __init__(self, d_model: int, attr_classes: int, no_object_weight: float = 0.1):
        super().__init__()
        if not 0 < no_object_weight <= 1:
            raise ValueError(f"no_object_weight (the detection loss's eos_coef) must be in (0, 1], got "
                             f"{no_object_weight}")
        self.member_offset = nn.Parameter(torch.tensor(math.log(no_object_weight)))
        self.sharpness = nn.Parameter(torch.zeros(()))  # P(q is the referent) ~ p ** exp(SHARPNESS_RATE * it)
        self.attr = nn.Linear(2 * d_model, attr_classes)
        nn.init.zeros_(self.attr.weight)
        nn.init.zeros_(self.attr.bias)

    def forward(self, hs: Tensor, logits: Tensor, boxes: Tensor, image_features: Tensor, image_valid: Tensor,
                count_classes: int) -> Dict[str, Tensor]:
        """The last decoder layer's hs [B, Q, d], token logits [B, Q, slots + 1] and boxes [B, Q, 4] (cxcywh,
        relative to the unpadded image); the projected backbone features [B, d, h, w] and their unpadded size in
        cells [B, 2] -> answer logit terms ``binary`` [B], ``reg`` [B, count_classes] (float32), ``attr``
        [B, classes] (float32)."""
        with torch.autocast(hs.device.type, enabled=False):
            log_prob = logits.float().log_softmax(-1)
            member_logit = torch.logsumexp(log_prob[..., :-1], -1) - log_prob[..., -1]  # [B, Q]
            member = (member_logit + self.member_offset).sigmoid()
            member = member.clamp(self.EPS, 1.0 - self.EPS)
            member = member * self.DETECTOR_GRAD + member.detach() * (1 - self.DETECTOR_GRAD)  # same value
            referent = member.log() * (self.SHARPNESS_RATE * self.sharpness).exp()  # log P(q is the referent) + c
            log_none = torch.log1p(-member.double()).sum(1)  # log P(count = 0), exactly
            exists = torch.log((-torch.expm1(log_none)).clamp(min=self.TINY)) - log_none
            counts = member_count_distribution(member, count_classes).clamp(min=self.TINY).log()
            local = sample_feature_map(image_features, boxes[..., :2].detach().float(), image_valid)  # [B, Q, d]
            features = torch.cat([hs.float(), local.float()], -1)
            per_query = self.attr(features.to(self.attr.weight.dtype)).float().log_softmax(-1)  # [B, Q, A]
            attr = torch.logsumexp(referent.log_softmax(1)[..., None] + per_query, 1)  # log sum_q P(q) P(a | q)
        return {"binary": exists.float(), "reg": counts.float(), "attr": attr}


def _float_linear(layer: nn.Linear, x: Tensor) -> Tensor:
    """``layer(x)`` in float32, whatever the dtype of the layer's parameters (which stay as they are)."""
    return F.linear(x.float(), layer.weight.float(), layer.bias.float())


class RelationHead(nn.Module):
    """Spatial relations between the detections (``relation_head``; not in MDETR; the relationship module of
    MAttNet, Yu et al. 2018, on DETR's outputs): each query's object score moves by how it lies, in the direction
    the caption names, from the other objects that the caption's words pick out.

    It reads the caption's own token features (the text encoder's outputs after the resizer, before the cross
    encoder). Attention over the tokens gives alpha (``anchor_token``: which words describe the objects to relate
    to) and pools the caption into a direction ``u`` in the image plane (``relation_token`` attention, then
    ``direction``; "left of" should give u = (+s, 0): the other object lies right). Query j's score as such an
    object is sum_l alpha_l logit_jl, its token logits weighed by alpha; for query i the other queries j get weights
    A_ij = softmax over j != i of those scores. The term

        bonus_i = u . sum_j A_ij tanh((c_j - c_i) / TAU)

    (c the box centres, detached) is subtracted from query i's no-object logit, which is the same as adding it to
    every token logit: the probability of being an object, and of each token, rises for a query that lies on the
    named side and falls for one on the other side. tanh of the centre offset answers "on which side" whatever the
    distance; a bias linear in the offset could not (its part common to every j cancels in the softmax).

    Why a head: through the cross encoder and decoder alone, the soft-token loss needs 11,000-16,000 relational
    samples on the shapes world before relational precision rises at all, even with content-conditioned spatial
    attention (README). Here what is to be learned is a few Linears on the caption's tokens. What a fine-tune
    learned (README): u points along the relation word's direction (beta's mass on that word 0.84), and alpha
    settles on the head words, not the anchor's: in that world the referent lies on the named side of every other
    object its head words describe, which its rivals do not. Read from the cross encoder's text outputs instead,
    u stayed near zero whatever the relation.

    Every Linear starts at zero (uniform attention, no bonus), so a model loaded without this head starts with its
    own outputs. Applied to every decoder layer's logits (one set of weights), in float32 or wider."""

    TAU = 0.05  # relative units: the shapes world's relations need 8 px between centres (0.03-0.05 of a side)
    SCALE = 8.0  # the direction's size per unit of its Linear's output
    RATE = 10.0  # the Linears' outputs are multiplied by this: Adam moves a weight by ~lr per step, and without
    # it a fine-tune at lr 1e-4 had not moved u noticeably after 1700 steps

    def __init__(self, d_model: int):
        super().__init__()
        self.anchor_token = nn.Linear(d_model, 1)
        self.relation_token = nn.Linear(d_model, 1)
        self.direction = nn.Linear(d_model, 2)
        for layer in (self.anchor_token, self.relation_token, self.direction):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def bonus(self, logits: Tensor, boxes: Tensor, text: Tensor, text_padding_mask: Tensor) -> Tensor:
        """logits [..., B, Q, slots + 1], boxes [..., B, Q, 4] (cxcywh), the caption's token features text [L, B, d],
        text_padding_mask [B, L] (True = pad) -> bonus [..., B, Q] (float32)."""
        with torch.autocast(logits.device.type, enabled=False):
            text = text.transpose(0, 1).float()  # [B, L, d]
            length = text.shape[1]
            pad = text_padding_mask.bool()
            alpha = (self.RATE * _float_linear(self.anchor_token, text).squeeze(-1)).masked_fill(pad, float("-inf"))
            alpha = alpha.softmax(-1)
            beta = (self.RATE * _float_linear(self.relation_token, text).squeeze(-1)).masked_fill(pad, float("-inf"))
            beta = beta.softmax(-1)
            direction = self.SCALE * self.RATE * _float_linear(self.direction, (beta[..., None] * text).sum(1))
            token_logits = logits[..., :length].float().masked_fill(pad[:, None, :], 0.0)  # FILL at pads: 0
            anchor = (token_logits * alpha[:, None, :]).sum(-1)  # [..., B, Q]
            queries = anchor.shape[-1]
            if queries < 2:  # no other query to relate to
                return anchor.new_zeros(anchor.shape)
            others = torch.eye(queries, dtype=torch.bool, device=anchor.device)
            weights = anchor[..., None, :].expand(*anchor.shape, queries).masked_fill(others, float("-inf"))
            weights = weights.softmax(-1)  # [..., B, Q (i), Q (j)]
            centres = boxes[..., :2].detach().float()
            side = torch.tanh((centres[..., None, :, :] - centres[..., :, None, :]) / self.TAU)  # [..., i, j, 2]
            towards = torch.einsum("...ij,...ijc->...ic", weights, side)  # [..., B, Q, 2]
            return (towards * direction[:, None, :]).sum(-1)

    def forward(self, logits: Tensor, boxes: Tensor, text: Tensor, text_padding_mask: Tensor) -> Tensor:
        """The logits with ``bonus`` subtracted from their no-object column (same shapes and dtype)."""
        bonus = self.bonus(logits, boxes, text, text_padding_mask).to(logits.dtype)
        return torch.cat([logits[..., :-1], logits[..., -1:] - bonus[..., None]], -1)


class AppearanceHead(nn.Module):
    """How each detection looks, against each word of the caption (``appearance_head``; not in MDETR; a late-fusion
    region-word score, as the matching of MAttNet's attribute module): every layer's token logits get

        s_qt = RATE * <look(q), word(x_t)> / sqrt(dim)

    look(q): an MLP over the image's own pixels on a GRID x GRID grid over the central SPAN of query q's box (the
    boxes detached: where to look is not trained here) and the projected backbone features at the box centre;
    word(x_t): a Linear of token t's features (the caption's own, after the resizer, as ``RelationHead`` reads).
    Added to a token logit, s raises that token's probability and lowers the no-object probability of a box that
    looks like the word says, and the reverse for one that does not.

    The same looks and words also enter a contrastive loss of their own (``loss_appearance_align``; MDETR's
    contrastive alignment with s as its logits, temperature 1, padded tokens masked): its tokens-to-boxes half is a
    softmax over the queries, which teaches the look of the box a word names apart from the other boxes' looks. The
    soft-token loss alone teaches s mostly on the matched boxes (the unmatched ones weigh ``eos_coef``, 0.1).

    Why a head: among referring-expression misses, most top boxes sit on an object of the named shape in another
    colour (README). The backbone features hold the colour (a linear probe reads it at 0.94), but the cross encoder
    and decoder wash most of it out (0.58 and 0.36 at the decoder's first and last layers), and neither giving the
    cross encoder the pixels' colours nor handing the box-centre features back to the decoder's outputs closed the
    gap. Here the box's look meets the words without passing through either.

    With ``objectness`` (``model.appearance_objectness``) the scores also vote on each box's no-object logit:

        no_object_q -= sum_t gate(x_t) s_qt

    with ``gate`` a Linear of the token features (starting at zero). Added to the token logits alone, s works as an
    OR under the softmax: a box of the named shape in another colour keeps its probability on the shape word, and
    with it its object score, however little its look matches the colour word; the gate lets a mismatched word
    veto the box.

    With ``location`` (``model.appearance_location``) the look also reads where the box is and how big, MAttNet's
    location vector (its corners and its area, relative to the image), through a Linear of its own added to the
    first layer's output: a box's pixels, sampled on a fixed grid over it, do not say whether it is small or large.

    ``word``, ``gate`` and ``location`` start at zero (s = 0: a model loaded without this head, or without the
    location, starts with its own outputs); ``look`` starts at random, so that the gradient reaches ``word`` from
    the first step. In float32 or wider."""

    GRID = 3  # pixel samples per side
    SPAN = 0.3  # of the box's width and height, around its centre: inside the shapes world's stars and triangles
    RATE = 10.0  # as RelationHead's: the word Linear's output is multiplied by this, so that Adam moves it in time

    def __init__(self, d_model: int, dim: int = 64, objectness: bool = False, location: bool = False):
        super().__init__()
        self.look_hidden = nn.Linear(3 * self.GRID ** 2 + d_model, d_model)
        self.look = nn.Linear(d_model, dim)
        self.word = nn.Linear(d_model, dim)
        self.gate = nn.Linear(d_model, 1) if objectness else None
        self.location = nn.Linear(5, d_model) if location else None
        for layer in (self.word, self.gate, self.location):
            if layer is not None:
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    def embeddings(self, boxes: Tensor, features: Tensor, valid: Tensor, images: Tensor, images_valid: Tensor,
                   text: Tensor, text_padding_mask: Tensor) -> Tuple[Tensor, Tensor]:
        """boxes [..., B, Q, 4] (cxcywh, relative), projected features [B, d, h, w] with their unpadded size in cells
        [B, 2], images [B, 3, H, W] with theirs in pixels, the caption's token features text [L, B, d] and
        text_padding_mask [B, L] (True = pad) -> looks [..., B, Q, dim] and words [B, L, dim] (float32; words
        scaled by RATE / sqrt(dim) and 0 at pads), so that s = looks @ words^T."""
        with torch.autocast(boxes.device.type, enabled=False):
            where = boxes.detach().float()
            lead, (batch, queries) = where.shape[:-3], where.shape[-3:-1]
            where = where.movedim(-3, 0).reshape(batch, -1, 4)  # [B, (...) * Q, 4]
            pixels = sample_feature_map(images.float(), box_grid_points(where, self.GRID, self.SPAN), images_valid)
            centre = sample_feature_map(features.float(), where[..., :2], valid)
            look = _float_linear(self.look_hidden, torch.cat([pixels.reshape(*where.shape[:2], -1), centre], -1))
            if self.location is not None:
                look = look + _float_linear(self.location, box_location(where))
            look = _float_linear(self.look, F.relu(look))  # [B, (...) * Q, dim]
            look = look.reshape(batch, *lead, queries, -1).movedim(0, -3)  # [..., B, Q, dim]
            words = _float_linear(self.word, text.transpose(0, 1).float()) * (self.RATE / math.sqrt(look.shape[-1]))
            return look, words.masked_fill(text_padding_mask.bool()[..., None], 0.0)  # [B, L, dim]

    @staticmethod
    def _product(looks: Tensor, words: Tensor) -> Tensor:
        """s = looks @ words^T [..., B, Q, L] in float32, whatever autocast the caller runs under."""
        with torch.autocast(looks.device.type, enabled=False):
            return looks @ words.transpose(-1, -2)

    def scores(self, *args: Tensor) -> Tensor:
        """``embeddings``' arguments -> s [..., B, Q, L] (float32; 0 at pads)."""
        return self._product(*self.embeddings(*args))

    def forward(self, logits: Tensor, boxes: Tensor, features: Tensor, valid: Tensor, images: Tensor,
                images_valid: Tensor, text: Tensor, text_padding_mask: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """The logits [..., B, Q, slots + 1] with s added to their first L (token) columns (and, with ``objectness``,
        the gated sum of s subtracted from their no-object column), and ``embeddings``."""
        looks, words = self.embeddings(boxes, features, valid, images, images_valid, text, text_padding_mask)
        scores = self._product(looks, words)  # 0 at pads
        length = scores.shape[-1]
        no_object = logits[..., -1:]
        if self.gate is not None:
            with torch.autocast(scores.device.type, enabled=False):
                gate = self.RATE * _float_linear(self.gate, text.transpose(0, 1).float()).squeeze(-1)  # [B, L]
                veto = (scores * gate[:, None, :]).sum(-1, keepdim=True)  # pads: s = 0
            no_object = (no_object.float() - veto).to(logits.dtype)
        logits = torch.cat([logits[..., :length] + scores.to(logits.dtype), logits[..., length:-1], no_object], -1)
        return logits, looks, words


class MDETR(nn.Module):
    """Modulated detection. ``forward(images, mask, captions)`` = ``decode(encode(images, mask, captions))``.

    Args:
        backbone: the reference's Joiner (timm features + sine positions).
        transformer: text encoder, cross encoder and decoder.
        num_queries: object queries.
        num_classes: token slots of the class head (255; one more column for no-object).
        contrastive_align_dim: size of the contrastive alignment projections; 0 = none (the reference's GQA models,
            trained with --no_contrastive_align_loss).
        qa_dataset: None, "clevr" or "gqa": adds one learned query per QA head after the object queries.
        qa_layer: the decoder layer whose outputs at the QA slots the answer heads read: 0 = the first (the
            reference's quirk), -1 = the last (after every layer's attention to the image, text and objects).
        clevr_attr_classes: size of the CLEVR attribute answer vocabulary (15 in CLEVR).
        qa_readout: "slots" = the reference (each answer head reads its QA slot); "objects" (CLEVR heads only; not
            in MDETR) also reads the answers from the object queries' detections (``ObjectQAReadout``).
        qa_no_object_weight: with ``qa_readout="objects"``, the training loss's ``eos_coef``: the readout's member
            calibration starts from it (a learned parameter, so a trained model's value comes with its weights).
        predict_final: CLEVR-Ref+ "is this box the referred set" head (``isfinal_embed``, ``pred_isfinal``).
        query_grid: 0 = the reference's learned object queries. G > 0 = anchor queries (not in MDETR; Anchor-DETR /
            two-stage Deformable DETR style): one query per cell centre of a G x G grid over each image's valid
            region, starting from the encoder memory and the position encoding sampled there, and predicting its
            box relative to that cell (``num_queries`` must be G * G). DETR's learned queries take tens of
            epochs to leave the "same boxes for every image" plateau; anchored queries start localized.
        token_head: "linear" = the reference's ``class_embed`` (Linear over the 256 slots); "similarity" =
            ``TokenSimilarityHead`` (not in MDETR; same output, logits from query-token similarity).
        box_refine: each decoder layer's box is an offset (in logit space) from the previous layer's box, detached
            (Deformable DETR's iterative refinement; not in MDETR; no parameters of its own). The first layer's
            reference is the query's anchor cell, or none for learned queries.
        box_roi: "none" (the reference); "features" or "pixels" (not in MDETR): the last layer's boxes get a second
            look (``BoxRoIRefiner``) from the projected backbone features and, with "pixels", the image's pixels
            sampled over each box; ``pred_boxes`` are the refined boxes, the auxiliary layers' are not refined.
        relation_head: False (the reference); True (not in MDETR): ``RelationHead`` moves every layer's no-object
            logits by where each box lies, in the direction the caption names, from the objects its words pick.
        appearance_head: False (the reference); True (not in MDETR): ``AppearanceHead`` adds to every layer's token
            logits a score of how each box's pixels and features match each word.
        appearance_objectness: with ``appearance_head``, those scores also move the no-object logits, each word's by
            a learned gate (``AppearanceHead``'s ``objectness``).
        appearance_location: with ``appearance_head``, each box's look also reads its corners and area
            (``AppearanceHead``'s ``location``).
    """

    def __init__(self, backbone: Joiner, transformer: Transformer, num_queries: int = 100, num_classes: int = 255,
                 contrastive_align_dim: int = 64, qa_dataset: Optional[str] = None, clevr_attr_classes: int = 15,
                 predict_final: bool = False, query_grid: int = 0, token_head: str = "linear",
                 box_refine: bool = False, qa_layer: int = 0, qa_readout: str = "slots", box_roi: str = "none",
                 qa_no_object_weight: float = 0.1, relation_head: bool = False, appearance_head: bool = False,
                 appearance_objectness: bool = False, appearance_location: bool = False):
        super().__init__()
        layers = len(transformer.decoder.layers)
        if not -layers <= qa_layer < layers:
            raise ValueError(f"qa_layer must index one of the {layers} decoder layers, got {qa_layer}")
        if token_head not in ("linear", "similarity"):
            raise ValueError(f"token_head must be 'linear' or 'similarity', got {token_head!r}")
        if query_grid < 0 or (query_grid and num_queries != query_grid ** 2):
            raise ValueError(f"query_grid must be 0 or G > 0 with num_queries == G * G, got query_grid={query_grid}, "
                             f"num_queries={num_queries}")
        if qa_dataset not in (None, *QA_HEADS):
            raise ValueError(f"qa_dataset must be None or one of {sorted(QA_HEADS)}, got {qa_dataset!r}")
        if qa_readout not in ("slots", "objects"):
            raise ValueError(f"qa_readout must be 'slots' or 'objects', got {qa_readout!r}")
        if box_roi not in ("none", "features", "pixels"):
            raise ValueError(f"box_roi must be 'none', 'features' or 'pixels', got {box_roi!r}")
        if qa_readout == "objects" and qa_dataset != "clevr":
            raise ValueError(f"qa_readout='objects' reads CLEVR's existence, count and attribute answers; it needs "
                             f"qa_dataset='clevr', got qa_dataset={qa_dataset!r}")
        d_model = transformer.d_model
        self.num_queries = num_queries
        self.transformer = transformer
        self.token_head = token_head
        self.class_embed = (nn.Linear(d_model, num_classes + 1) if token_head == "linear"
                            else TokenSimilarityHead(d_model, num_classes))
        self.isfinal_embed = nn.Linear(d_model, 1) if predict_final else None
        self.bbox_embed = MLP(d_model, d_model, 4, 3)
        self.query_grid = query_grid
        self.box_refine = box_refine
        self.query_embed = None if query_grid else nn.Embedding(num_queries, d_model)
        self.qa_dataset = qa_dataset
        self.qa_layer = qa_layer
        self.qa_heads = [] if qa_dataset is None else [
            (name, clevr_attr_classes if (qa_dataset, name) == ("clevr", "attr") else size, mlp)
            for name, size, mlp in QA_HEADS[qa_dataset]
        ]
        if self.qa_heads:
            self.qa_embed = nn.Embedding(len(self.qa_heads), d_model)
        self.input_proj = nn.Conv2d(backbone.num_channels, d_model, kernel_size=1)
        self.backbone = backbone
        if contrastive_align_dim:
            self.contrastive_align_projection_image = nn.Linear(d_model, contrastive_align_dim)
            self.contrastive_align_projection_text = nn.Linear(d_model, contrastive_align_dim)
        self.contrastive_align_dim = contrastive_align_dim
        for name, size, mlp in self.qa_heads:  # answer_<name>_head
            head = MLP(d_model, d_model, size, 3) if mlp else nn.Linear(d_model, size)
            self.add_module(f"answer_{name}_head", head)
        self.qa_readout = qa_readout
        self.qa_object_readout = (ObjectQAReadout(d_model, clevr_attr_classes, qa_no_object_weight)
                                  if qa_readout == "objects" else None)
        self.box_roi = box_roi
        self.box_roi_refiner = None if box_roi == "none" else BoxRoIRefiner(d_model, pixels=box_roi == "pixels")
        self.relation_head = RelationHead(d_model) if relation_head else None
        for name, value in (("appearance_objectness", appearance_objectness),
                            ("appearance_location", appearance_location)):
            if value and not appearance_head:
                raise ValueError(f"{name}=True is a part of the appearance head; it needs appearance_head=True, got "
                                 f"appearance_head=False")
        self.appearance_head = (AppearanceHead(d_model, objectness=appearance_objectness, location=appearance_location)
                                if appearance_head else None)

    def encode(self, images: Tensor, mask: Tensor, captions: Sequence[str]) -> Dict[str, Any]:
        """images [B, 3, H, W], mask [B, H, W] (True = pad), captions: B strings -> memory cache (see
        ``Transformer``)."""
        return self.encode_features(*self.backbone(images, mask), captions, images=images, mask=mask)

    def encode_features(self, features: Tensor, feature_mask: Tensor, pos: Tensor, captions: Sequence[str],
                        images: Optional[Tensor] = None, mask: Optional[Tensor] = None) -> Dict[str, Any]:
        """``encode`` after the backbone, from its outputs ``self.backbone(images, mask)``: features [B, C, h, w],
        feature_mask [B, h, w] (True = pad), pos [B, d, h, w], and B captions -> memory cache. ``images`` and
        ``mask`` (B or 1 of them) are needed only by ``box_roi="pixels"`` and ``appearance_head``, which read the
        boxes' pixels.

        The cross encoder needs image and text jointly, the backbone only the image: several captions of one
        image share one backbone pass by expanding its B = 1 outputs to the number of captions."""
        readers = [name for name, reads in (("box_roi='pixels'", self.box_roi == "pixels"),
                                            ("appearance_head", self.appearance_head is not None)) if reads]
        reads_pixels = bool(readers)
        if reads_pixels and (images is None or mask is None):
            raise ValueError(f"{' and '.join(readers)} {'reads' if len(readers) == 1 else 'read'} the images' pixels: "
                             f"pass images= and mask= to encode_features")
        learned = [] if self.query_embed is None else [self.query_embed.weight]
        if self.qa_heads:
            learned.append(self.qa_embed.weight)
        query_embed = torch.cat(learned, 0) if learned else pos.new_zeros(0, pos.shape[1])
        projected = self.input_proj(features)
        cache = self.transformer.encode(projected, feature_mask, pos, query_embed, captions)
        if reads_pixels or self.qa_object_readout is not None or self.box_roi_refiner is not None:
            cache.update(image_features=projected, image_valid=unpadded_cells(feature_mask).to(pos.dtype))
        if reads_pixels:
            batch = features.shape[0]
            cache.update(images=images.expand(batch, -1, -1, -1),
                         images_valid=unpadded_cells(mask).to(pos.dtype).expand(batch, -1))
        if self.query_grid:
            self._add_anchor_queries(cache, feature_mask, pos)
        return cache

    def _add_anchor_queries(self, cache: Dict[str, Any], feature_mask: Tensor, pos: Tensor) -> None:
        """Prepend the G * G anchor queries to the cache's queries (QA slots stay last): ``query_embed`` gets the
        position encoding at each cell centre, ``query_content`` (the decoder's starting ``tgt``; zeros for QA
        slots) the encoder memory there, and ``reference_boxes`` [B, G * G, 4] the cells as cxcywh boxes.

        feature_mask [B, h, w] (True = pad, padding bottom/right), pos [B, d, h, w]; the memory's first h * w
        positions are the image tokens, row-major."""
        batch, d_model, h, w = pos.shape
        valid = unpadded_cells(feature_mask).to(pos.dtype)
        grid = self.query_grid
        centres = (torch.arange(grid, device=pos.device, dtype=pos.dtype) + 0.5) / grid
        cy, cx = torch.meshgrid(centres, centres, indexing="ij")
        points = torch.stack([cx.flatten(), cy.flatten()], -1)  # [G*G, 2] (x, y) in the valid region
        memory = cache["img_memory"][: h * w].permute(1, 2, 0).reshape(batch, d_model, h, w)
        points = points.expand(batch, -1, -1)
        anchor_pos = sample_feature_map(pos.to(memory.dtype), points, valid).transpose(0, 1)  # [G*G, B, d]
        queries = cache["query_embed"]  # [num QA slots, B, d]
        cache["query_embed"] = torch.cat([anchor_pos, queries], 0)
        content = sample_feature_map(memory, points, valid).transpose(0, 1)
        cache["query_content"] = torch.cat([content, torch.zeros_like(queries)], 0)
        sizes = points.new_full((grid * grid, 2), 1.0 / grid)
        cache["reference_boxes"] = torch.cat([points[0], sizes], -1).expand(batch, -1, -1)

    def decode(self, memory_cache: Dict[str, Any]) -> Dict[str, Any]:
        """memory cache -> the outputs dict (module docstring)."""
        hs = self.transformer.decode(memory_cache)  # [N, B, Q (+ QA slots), d]
        out: Dict[str, Any] = {}
        if self.qa_heads:
            # quirk (reference): the answers are read from the FIRST decoder layer's outputs (qa_layer 0)
            answer_embeds = hs[self.qa_layer, :, -len(self.qa_heads):]
            hs = hs[:, :, : -len(self.qa_heads)]
            for slot, (name, _, _) in enumerate(self.qa_heads):
                logits = getattr(self, f"answer_{name}_head")(answer_embeds[:, slot])
                out[f"pred_answer_{name}"] = logits.squeeze(-1) if name == "binary" else logits
        if self.token_head == "linear":
            outputs_class = self.class_embed(hs)
        else:
            outputs_class = self.class_embed(hs, memory_cache["text_memory"], memory_cache["text_attention_mask"])
        box_offsets = self.bbox_embed(hs)
        reference = memory_cache.get("reference_boxes")  # anchor queries: offsets in logit space from each cell
        if reference is not None:
            reference = torch.logit(reference, eps=1e-5).to(box_offsets.dtype)
        if self.box_refine:
            layers = []
            for offsets in box_offsets:
                layers.append((offsets if reference is None else offsets + reference).sigmoid())
                reference = torch.logit(layers[-1].detach(), eps=1e-5)
            outputs_coord = torch.stack(layers)
        else:
            outputs_coord = (box_offsets if reference is None else box_offsets + reference).sigmoid()
        if self.box_roi_refiner is not None:
            refined = self.box_roi_refiner(hs[-1], outputs_coord[-1], memory_cache["image_features"],
                                           memory_cache["image_valid"], memory_cache.get("images"),
                                           memory_cache.get("images_valid"))
            outputs_coord = torch.cat([outputs_coord[:-1], refined[None]])
        if self.relation_head is not None:
            outputs_class = self.relation_head(outputs_class, outputs_coord, memory_cache["text_memory_resized"],
                                               memory_cache["text_attention_mask"])
        if self.appearance_head is not None:
            outputs_class, looks, words = self.appearance_head(
                outputs_class, outputs_coord, memory_cache["image_features"], memory_cache["image_valid"],
                memory_cache["images"], memory_cache["images_valid"], memory_cache["text_memory_resized"],
                memory_cache["text_attention_mask"])
        if self.qa_object_readout is not None:
            terms = self.qa_object_readout(hs[-1], outputs_class[-1], outputs_coord[-1],
                                           memory_cache["image_features"], memory_cache["image_valid"],
                                           out["pred_answer_reg"].shape[-1])
            for name, term in terms.items():
                out[f"pred_answer_{name}"] = out[f"pred_answer_{name}"].float() + term
        tokenized = memory_cache["tokenized"]
        out.update(pred_logits=outputs_class[-1], pred_boxes=outputs_coord[-1], tokenized=tokenized)
        out["aux_outputs"] = [{"pred_logits": c, "pred_boxes": b, "tokenized": tokenized}
                              for c, b in zip(outputs_class[:-1], outputs_coord[:-1])]
        if self.contrastive_align_dim:
            proj_queries = F.normalize(self.contrastive_align_projection_image(hs), p=2, dim=-1)
            proj_tokens = F.normalize(self.contrastive_align_projection_text(memory_cache["text_memory"])
                                      .transpose(0, 1), p=2, dim=-1)  # [L, B, d] -> [B, L, D]
            out.update(proj_queries=proj_queries[-1], proj_tokens=proj_tokens)
            for aux, queries in zip(out["aux_outputs"], proj_queries[:-1]):
                aux.update(proj_queries=queries, proj_tokens=proj_tokens)
        if self.appearance_head is not None:  # for loss_appearance_align
            out.update(appearance_looks=looks[-1], appearance_words=words)
            for aux, layer_looks in zip(out["aux_outputs"], looks[:-1]):
                aux.update(appearance_looks=layer_looks, appearance_words=words)
        if self.isfinal_embed is not None:
            outputs_isfinal = self.isfinal_embed(hs)
            out["pred_isfinal"] = outputs_isfinal[-1]
            for aux, isfinal in zip(out["aux_outputs"], outputs_isfinal[:-1]):
                aux["pred_isfinal"] = isfinal
        return out

    def forward(self, images: Tensor, mask: Tensor, captions: Sequence[str]) -> Dict[str, Any]:
        return self.decode(self.encode(images, mask, captions))


def build_mdetr(backbone: str = "tf_efficientnet_lite0", pretrained_backbone: bool = True,
                backbone_stride: int = 32, train_backbone: bool = True, backbone_freeze: str = "reference",
                backbone_per_image: bool = False,
                frozen_bn_eps: Optional[float] = 1e-5, text_encoder: str = "all-MiniLM-L6-v2",
                freeze_text_encoder: bool = False, d_model: int = 256, nheads: int = 8, enc_layers: int = 6,
                dec_layers: int = 6, dim_feedforward: int = 2048, dropout: float = 0.1, num_queries: int = 100,
                contrastive_align_dim: int = 64, qa_dataset: Optional[str] = None, clevr_attr_classes: int = 15,
                predict_final: bool = False, query_grid: int = 0, token_head: str = "linear", box_refine: bool = False,
                qa_layer: int = 0, qa_readout: str = "slots", spatial_attention: str = "none", box_roi: str = "none",
                qa_no_object_weight: float = 0.1, relation_head: bool = False, appearance_head: bool = False,
                appearance_objectness: bool = False, appearance_location: bool = False,
                attention_backend: str = "reference",
                load_backbone_weights: bool = True, text_encoder_config: Optional[PretrainedConfig] = None) -> MDETR:
    """MDETR with explicit settings (defaults: the paper's sizes on the embedded lite0 + MiniLM encoders).

    ``train_backbone=False`` freezes the whole backbone (same as ``backbone_freeze="all"``); ``backbone_freeze``
    "reference" trains only layer2-4 of a pretrained ResNet and everything of other backbones (batch norms are
    frozen whenever the backbone is pretrained). ``frozen_bn_eps`` None keeps each norm's own eps (the reference
    uses 1e-5 everywhere, also for EfficientNets trained with 1e-3).

    For a model whose every value comes from a checkpoint (``mdetr.hub``): ``load_backbone_weights=False`` builds a
    pretrained backbone's modules without reading its ImageNet weights, and ``text_encoder_config`` builds the text
    encoder from that configuration without weights (``text_encoder`` then only names the tokenizer)."""
    joiner = build_backbone(backbone, pretrained_backbone, backbone_stride,
                            backbone_freeze if train_backbone else "all", d_model // 2, frozen_bn_eps,
                            load_backbone_weights, backbone_per_image)
    if spatial_attention in ("decoder", "both") and not query_grid:
        raise ValueError(f"spatial_attention={spatial_attention!r} needs anchor queries (query_grid > 0): the "
                         "decoder's spatial bias is relative to each query's anchor")
    transformer = Transformer(text_encoder, freeze_text_encoder, d_model, nheads, enc_layers, dec_layers,
                              dim_feedforward, dropout, attention_backend, text_encoder_config, spatial_attention)
    return MDETR(joiner, transformer, num_queries, contrastive_align_dim=contrastive_align_dim,
                 qa_dataset=qa_dataset, clevr_attr_classes=clevr_attr_classes, predict_final=predict_final,
                 query_grid=query_grid, token_head=token_head, box_refine=box_refine, qa_layer=qa_layer,
                 qa_readout=qa_readout, box_roi=box_roi, qa_no_object_weight=qa_no_object_weight,
                 relation_head=relation_head, appearance_head=appearance_head,
                 appearance_objectness=appearance_objectness, appearance_location=appearance_location)


def param_groups(model: nn.Module) -> Dict[str, List[nn.Parameter]]:
    """Trainable parameters by lr group: "backbone" (``backbone.*``), "text_encoder" (``*text_encoder*``), "rest"."""
    groups: Dict[str, List[nn.Parameter]] = {"rest": [], "backbone": [], "text_encoder": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith("backbone."):
            groups["backbone"].append(param)
        elif "text_encoder" in name:
            groups["text_encoder"].append(param)
        else:
            groups["rest"].append(param)
    return groups
