"""The paper's localisation net (section 4.5, Appendix A): VGG-16 (D) with fc8 replaced by a box regressor.

    python -m vggjax.main --config=configs/vgg16_loc.py[:pcr|scr][,256|384] --workdir=DIR \
        --config.init_from=CLASSIFIER_RUN --config.data.data_dir=ROOT

The recipe of Appendix A: per-class (pcr, the default: 4 x classes outputs) or single-class (scr: 4 outputs)
regression of the box (centre, width, height), the Euclidean loss, training as for classification at a fixed
S (256 or 384) with an initial learning rate of 1e-3, all layers initialised from the classification net of
the same configuration except fc8 (init_from copies the conv body, fc6 and fc7). To fine-tune only the FC
layers (the paper's comparison: all layers win), add --config.train.trainable=fc*.

Data: images with boxes: an image folder (ROOT/train/<class>/..., ROOT/val/<class>/...) with ROOT/boxes.json
(data.boxes_file; see vggjax.data.boxes_source: ImageNet's CLS-LOC boxes go there per image), or a TFDS
dataset with a class label and a BBoxFeature (--config.data.source=tfds --config.data.name=stanford_dogs
--config.data.bbox_key=objects/bbox).
"""

from vggjax.configs import common, default


def get_config(arg: str | None = None):
  head, scale = 'pcr', '256'
  for part in (arg or '').split(','):
    if part in ('pcr', 'scr'):
      head = part
    elif part:
      scale = part
  if scale not in ('256', '384'):
    raise ValueError(f'vgg16_loc: the localisation nets train at a fixed S of 256 or 384, got {scale!r}')
  config = default.get_config()
  config.model.name = 'vgg16'
  config.model.head = head
  common.set_scale(config, scale)
  config.optimizer.lr = 1e-3
  config.init_layers = 'all'  # every layer whose name and shape match: all but fc8
  config.data.source = 'folder'
  config.data.name = ''
  config.data.boxes_file = 'boxes.json'
  config.data.bbox_key = ''
  return config
