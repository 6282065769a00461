"""Folder datasets use every image tf.io.decode_image reads: PNG and WebP,
any extension case, file names that are not UTF-8; other files are counted
in one note; unreadable files are counted once each and named."""
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from conftest import smoke_config
from moco_jax.data import pipeline, sources
from test_train import run_cli


def _write(path: bytes, data: bytes):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(data)


def _encoded(colour, fmt):
  buffer = io.BytesIO()
  image = np.broadcast_to(np.array(colour, np.uint8), (20, 24, 3))
  Image.fromarray(np.ascontiguousarray(image)).save(
      buffer, format=fmt, **({'lossless': True} if fmt == 'WEBP' else {}))
  return buffer.getvalue()


def build_folder(root: bytes):
  """10 solid-colour images (PNG, .PNG, WebP, a Latin-1 name), 2 unreadable
  ones, 3 files to ignore. Returns (colours of the readable images, sorted
  unreadable paths)."""
  colours, names = [], [b'01.png', b'02.PNG', b'03.webp', b'04.WEBP', b'caf\xe9.png',
                        b'06.webp', b'07.png', b'08.webp', b'09.png', b'10.webp']
  for index, name in enumerate(names):
    colour = (20 * index + 10, 250 - 20 * index, (70 * index) % 256)
    colours.append(colour)
    fmt = 'WEBP' if name.lower().endswith(b'.webp') else 'PNG'
    _write(os.path.join(root, b'ab'[index % 2:index % 2 + 1], name), _encoded(colour, fmt))
  bad = [os.path.join(root, b'a', b'bad.jpg'), os.path.join(root, b'b', b'trunc\xff.PNG')]
  _write(bad[0], b'\xff\xd8\xff\xe0 not a jpeg')
  _write(bad[1], _encoded((1, 2, 3), 'PNG')[:40])
  _write(os.path.join(root, b'a', b'notes.txt'), b'text')
  _write(os.path.join(root, b'b', b'scan.tiff'), _encoded((9, 9, 9), 'TIFF'))
  _write(os.path.join(root, b'b', b'.DS_Store'), b'\0')
  return colours, sorted(bad)


@pytest.fixture
def folder(tmp_path):
  root = os.fsencode(str(tmp_path / 'images'))
  colours, bad = build_folder(root)
  return os.fsdecode(root), colours, bad


def test_every_readable_image_trains_and_bad_files_are_named_once(folder, capsys):
  root, colours, bad = folder
  config = smoke_config('', **{'data.image_size': 8})
  config.data.dataset = f'folder:{root}'
  config.data.train_split = '.'   # the folder itself: its subfolders are the classes
  info = sources.dataset_info(config.data)
  assert info.num_examples == 12 and info.class_names == ('a', 'b')
  notes = [l for l in capsys.readouterr().out.splitlines() if l.startswith('note:')]
  assert notes == [f'note: {root}: ignored 3 non-image files (1 .tiff, 1 .txt, '
                   f'1 hidden); images are the files tf.io.decode_image reads, '
                   f'ending in .jpg .jpeg .png .gif .bmp .webp (any case)']
  batches = pipeline.pretrain_batches(config.data, 4, seed=0)
  assert batches.steps_per_epoch == 3                         # 12 files, every position
  for epoch in range(3):
    epoch_batches = [next(batches) for _ in range(3)]
    seen = {tuple(int(c) for c in image[0, 0])
            for batch in epoch_batches for image in batch['images_q']}
    assert seen == set(colours), epoch                        # every image, each epoch
  assert batches.skipped_images == 2                          # per file, not per epoch
  assert batches.unreadable_names == bad


def test_cli_names_the_unreadable_files(folder, tmp_path):
  root, _, bad = folder
  workdir = tmp_path / 'run'
  result = run_cli(workdir, '', f'--config.data.dataset=folder:{root}',
                   '--config.data.train_split=.', '--config.train.batch_size=4', '--config.moco.bn_groups=2',
                   '--config.moco.queue_size=8', '--config.train.num_steps=6',
                   '--config.train.log_every=3', '--config.data.image_size=8')
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'note: {root}: ignored 3 non-image files' in result.stdout
  with open(workdir / 'skipped_images.txt', 'rb') as f:
    assert f.read().splitlines() == bad
  events = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  assert [e['skipped_images'] for e in events if 'loss' in e] == [2, 2]
  assert 'skipped 2 unreadable images so far' in result.stdout + result.stderr
  # TensorFlow's own decoder messages stay off the console.
  assert 'rendezvous' not in result.stderr and 'DecodeImage' not in result.stderr
