"""Evaluation: the paper's protocols (sections 3.2 and 4) over every image of a validation split, and the
evaluator interface that validation during training, ``vggjax.evaluate``, ``vggjax.predict`` and
``vggjax.features`` share.

Modules, along the jobs of an evaluation:

* ``scales``: test scales, the multi-crop grid, the dense buckets (host side, pure);
* ``inference``: the one path from uint8 images to class scores, posteriors and descriptors (on the device);
* ``metrics``: top-k errors and fusion;
* ``loading``: the networks to evaluate (EvalModel, load_model);
* ``planning``: reading and rescaling the records, the batches every process runs;
* ``engine``: ``evaluate``, every model, protocol and scale over a split (EvalResult);
* ``report``: the paper-style table and eval.json;
* ``evaluators``: the interface (ValidationEvaluator, ProtocolEvaluator, ImageEvaluator).

The command is ``python -m vggjax.evaluate`` (vggjax/evaluate.py).

Protocols. The posterior of an image is the softmax of its class scores; top-1/top-5 errors are counted on
the averaged posteriors.

* ``single``: rescale the image isotropically so that its smaller side is Q, take the central crop at the
  training size (exactly what validation during training does);
* ``dense``: rescale to Q and run the fully convolutional network over the whole image; the class score map
  is averaged over space and the softmax posteriors of the image and of its horizontal flip are averaged;
* ``multicrop``: rescale to Q, a regular 5x5 grid of crops at the training size (offsets
  ``k * (H - size) // 4`` and ``k * (W - size) // 4``, k = 0..4, so the grid's centre is the single crop)
  and the mirror image of each crop (the crops of the flipped image on the mirrored grid): 50 crops per
  scale, posteriors averaged;
* multi-scale: any protocol at several Q, posteriors averaged. Defaults follow the paper:
  {S - 32, S, S + 32} for a fixed training scale S, {Smin, (Smin + Smax) / 2, Smax} for a jittered one;
  the single-scale default is Q = S, or (Smin + Smax) / 2;
* ``dense+multicrop``: the dense and multi-crop posteriors averaged (the paper's best single net);
* fusion: with several checkpoints, every protocol is reported per model and for the average of the models'
  posteriors (each model at its own scales).

The flips are the paper's test-set augmentation; ``flip=False`` (``--flip=false``; the command's default
follows the config's data.flip) leaves them out for data trained without flips whose classes are not
mirror-symmetric (digits, text): dense is then the image alone, multi-crop the 25 grid crops.

Exactness on images of any aspect ratio. Dense evaluation needs the whole image, so images of different
shapes cannot share a batch as they are. Each rescaled image (smaller side exactly Q, the other side L as
``vggjax.data.transforms.rescaled_size`` gives it) is placed at the top-left of a bucket shape: the smaller
side Q and the longer side padded up to ``Q * r`` rounded up to a multiple of 32 for the smallest r in
``aspect_buckets`` (1, 4/3, 3/2, 2, 3 by default; beyond the last, a multiple of Q), in either orientation.
The padding is then made invisible: the input of every convolution (conv1_1 ... conv5_x and fc6) is
multiplied by the mask of the image's valid region at that resolution (floor(h / 2^b) x floor(w / 2^b)
after b poolings), which is the zero padding the unpadded network would see there, and the class score map
is averaged over the cells the unpadded network has ((h // 32 - k + 1) x (w // 32 - k + 1), k = fc6's
extent). The result equals the network run on the unpadded image (to float rounding; tested), with no
change of aspect ratio; the price is the compute spent on the padding (at most the gap to the next bucket).
The number of compiled dense shapes is the number of buckets that occur at a scale (at most twice the
number of aspect buckets, plus rare panoramas), reported in eval.json. Crops (single and multi-crop) are cut
on the device from the same padded images by a small per-bucket gather, and the network then runs on crops
of one shape: one compiled network for all scales.

Sharding. The global batch is split over the 'data' axis of a mesh of all devices of all processes, as in
training. Process p reads a contiguous block of the split; all processes run the same sequence of batch
shapes (the bucket counts are agreed with one all-gather), padded with masked slots, so every image is
evaluated exactly once; per-image posteriors stay on the process that read the image, and the hit counts
are summed over processes at the end. Images that cannot be read are left out, logged and counted
(``unreadable`` in eval.json); ``num_images`` is what each error was computed on. Host memory: per model and
protocol, a float32 posterior per image and class of this process's images at the current scale and
summed over scales (200 MB each for ImageNet's 50,000 x 1,000 on one host). Device memory: per device,
``batch_size / devices`` padded images (dense; the flip runs after the image) or 2 x crops_per_step crops
of each of them (multi-crop); lower --batch_size for large Q.

Output: WORKDIR/eval.json (per model and fused, per protocol, per scale set: top1_err, top5_err,
num_images, img_per_s; compiled shapes and buckets per scale) and a table laid out like the paper's
Tables 3-5 on stdout. The host decodes and rescales in threads; the device does everything else
(docs/design.md, decision 4: uint8 is shipped, the normalisation runs in the jitted functions).
"""

from vggjax.evaluation.engine import DEFAULT_PER_DEVICE_BATCH, EvalResult, evaluate
from vggjax.evaluation.evaluators import (EvalInterrupted, Evaluator, ImageEvaluator, ImageSettings,
                                          ProtocolEvaluator, ProtocolSettings, ValidationEvaluator)
from vggjax.evaluation.inference import (apply_batched, crop_posteriors, dense_logits, dense_posteriors,
                                         descriptor_fn, extract_crops, flip_valid, logits, posterior_fn)
from vggjax.evaluation.loading import EvalModel, load_model
from vggjax.evaluation.metrics import fuse, topk_error, topk_hits
from vggjax.evaluation.planning import plan_batches
from vggjax.evaluation.report import RESULTS_FILE, format_table, write_results
from vggjax.evaluation.scales import (ASPECT_BUCKETS, BASE_PROTOCOLS, BUCKET_MULTIPLE, GRID, PROTOCOLS,
                                      bucket_shape, bucket_side, default_scales, grid_offsets, single_scale,
                                      train_scale_label)

__all__ = [
    'DEFAULT_PER_DEVICE_BATCH',
    'EvalResult',
    'evaluate',
    'EvalInterrupted',
    'Evaluator',
    'ImageEvaluator',
    'ImageSettings',
    'ProtocolEvaluator',
    'ProtocolSettings',
    'ValidationEvaluator',
    'apply_batched',
    'crop_posteriors',
    'dense_logits',
    'dense_posteriors',
    'descriptor_fn',
    'extract_crops',
    'flip_valid',
    'logits',
    'posterior_fn',
    'EvalModel',
    'load_model',
    'fuse',
    'topk_error',
    'topk_hits',
    'plan_batches',
    'RESULTS_FILE',
    'format_table',
    'write_results',
    'ASPECT_BUCKETS',
    'BASE_PROTOCOLS',
    'BUCKET_MULTIPLE',
    'GRID',
    'PROTOCOLS',
    'bucket_shape',
    'bucket_side',
    'default_scales',
    'grid_offsets',
    'single_scale',
    'train_scale_label',
]
