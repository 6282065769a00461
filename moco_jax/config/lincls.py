"""The base configuration of linear evaluation (configs/lincls_*.py derive from it).

The protocol of MoCo v1/v2 (arXiv:1911.05722 §4.1): frozen backbone with BN in
inference mode, a new linear layer (weights N(0, 0.01), bias 0), SGD lr 30,
momentum 0.9, no weight decay, batch 256, 100 epochs, ×0.1 at epochs 60 and 80.
Section and key names follow pretraining's (`data`, `optim`, `train`, `eval`);
the model comes from the pretraining run's saved config.
"""
import ml_collections

from moco_jax.config.base import train_section


def lincls_base_config() -> ml_collections.ConfigDict:
  """ImageNet linear evaluation at 224 (RandomResizedCrop + flip; 256/224 center crop)."""
  c = ml_collections.ConfigDict()
  c.pretrained = ''                # a moco_jax pretraining workdir (required)
  c.pretrained_step = -1           # its checkpoint; -1: the newest (kept on resume)
  c.seed = 0
  # A parameter-free BatchNorm before the linear layer (moco-v3 issue 20);
  # off in the reference protocols (evaluation/linear.py).
  c.head_batch_norm = False

  c.data = ml_collections.ConfigDict()
  c.data.dataset = 'imagenet2012'  # a TFDS name, or folder:/path (a subfolder per class)
  c.data.data_dir = ''             # '' = TFDS's default (TFDS_DATA_DIR)
  c.data.train_split = 'train'
  c.data.eval_split = 'validation'
  c.data.image_size = 224
  # A balanced low-label subset: labels_per_class images of every class of
  # train_split, drawn with labels_seed, the same on every process
  # (data/subset.py); 0 = the whole split.
  c.data.labels_per_class = 0
  c.data.labels_seed = 0
  c.data.crop_scale = (0.08, 1.0)  # RandomResizedCrop's default
  c.data.normalization = ''        # '' = the pretraining's mean/std
  c.data.cache = False
  c.data.fused_jpeg_crop = False   # decode_and_crop_jpeg: no faster here (BENCHMARKS.md)
  # True/'auto': the split on the devices (config/base.py); bool or str.
  c.data.on_device = ml_collections.FieldReference(False, field_type=object)
  c.data.on_device_max_fraction = 0.25

  c.optim = ml_collections.ConfigDict()
  c.optim.name = 'sgd'
  c.optim.base_lr = 30.0
  c.optim.scale_lr = False         # True: base_lr is per 256 images, scaled by the batch
  c.optim.momentum = 0.9
  c.optim.weight_decay = 0.0
  c.optim.schedule = 'step'
  c.optim.lr_drop_epochs = (60, 80)
  c.optim.warmup_epochs = 0.0

  c.train = train_section(num_epochs=100, keep_checkpoints=2)

  c.eval = ml_collections.ConfigDict()
  c.eval.every_epochs = 1          # top-1/top-5 on data.eval_split; 0 = only at the end
  c.eval.batch_size = 512          # global
  return c


def lincls_v3_config(base_lr: float) -> ml_collections.ConfigDict:
  """MoCo v3's linear protocol (moco-v3 main_lincls.py defaults): SGD momentum
  0.9, no weight decay, base_lr per 256 images (scaled by the batch), batch
  1024, 90 epochs, cosine decay to 0 without warm-up (the reference decays per
  epoch, we per step). ResNet-50 and ViT recipes differ only in base_lr."""
  c = lincls_base_config()
  c.optim.name = 'sgd'
  c.optim.base_lr = base_lr
  c.optim.scale_lr = True
  c.optim.momentum = 0.9
  c.optim.weight_decay = 0.0
  c.optim.schedule = 'cosine'
  c.optim.warmup_epochs = 0.0
  c.train.batch_size = 1024
  c.train.num_epochs = 90
  return c
