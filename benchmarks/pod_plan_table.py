"""The recipes × TPU slices table of docs/pod_plan.md, made with the plan.

  python benchmarks/pod_plan_table.py [--saved=DIR] [--only=NAME,...]

Runs `python -m moco_jax.plan --json` for each row of ROWS (ResNet-50 takes
minutes to compile per row on a small CPU machine), saving each plan as
DIR/NAME.json (default /tmp/pod_plans; a saved plan is reused), then prints
the markdown table and one JSON line per row. Needs libtpu
(pip install -e ".[tpu]").
"""
import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# name, config, slice, overrides. More devices than the recipes' 8 BN groups
# need moco.bn_groups raised to a multiple of the device count (checks.py).
ROWS = [
    ('v2r50_b256_v4-8_stats', 'moco_v2_r50_imagenet', 'v4-8', []),
    ('v2r50_b256_v4-8_images', 'moco_v2_r50_imagenet', 'v4-8',
     ['--config.moco.shuffle_bn_mode=images']),
    ('v2r50_b4096_v5e-256_stats', 'moco_v2_r50_imagenet', 'v5e-256',
     ['--config.train.batch_size=4096', '--config.moco.bn_groups=256']),
    ('v2r50_b4096_v5e-256_images', 'moco_v2_r50_imagenet', 'v5e-256',
     ['--config.train.batch_size=4096', '--config.moco.bn_groups=256',
      '--config.moco.shuffle_bn_mode=images']),
    ('cifar_demo_v5e-8_stats', 'moco_v2_r18_cifar10', 'v5e-8', []),
    ('cifar_demo_v5e-8_images', 'moco_v2_r18_cifar10', 'v5e-8',
     ['--config.moco.shuffle_bn_mode=images']),
    ('v3vits_b4096_v5e-256', 'moco_v3_vit_small_imagenet', 'v5e-256', []),
    ('v3r50_b4096_v5e-256', 'moco_v3_r50_imagenet', 'v5e-256',
     ['--config.moco.bn_groups=256']),
    ('v3vitb_b4096_v5p-256', 'moco_v3_vit_base_imagenet', 'v5p-256', []),
]


def plan(name, recipe, topology, overrides, saved):
  path = os.path.join(saved, f'{name}.json')
  if not os.path.exists(path):
    result = subprocess.run(
        [sys.executable, '-m', 'moco_jax.plan', f'--config=configs/{recipe}.py',
         f'--topology={topology}', '--programs=pretrain', '--json', *overrides],
        cwd=REPO, capture_output=True, text=True)
    if result.returncode:
      return {'error': result.stderr.strip().splitlines()[-1:]}
    with open(path, 'w') as f:
      f.write(result.stdout)
  with open(path) as f:
    return json.load(f)


def row(name, recipe, result) -> str:
  if 'error' in result or not result.get('programs'):
    return f'| {recipe} | {name} | | | | | | | | | (not planned: {result.get("error")}) |'
  t, c = result['topology'], result['config']
  host = result['programs']['pretrain (host crops)']
  if 'compiler' in host:   # refused by the TPU compiler for HBM
    return (f'| {recipe} | {t["name"]} | {c["batch_size"]} ({c["batch_per_device"]}) | | '
            f'> {host["memory"]["total"] / 2**30:.1f} / '
            f'{t["hbm_bytes_per_chip"] / 2**30:.0f} ✗ | | | | | | |')
  gib = host['memory']['total'] / 2**30
  moved = sum(x['bytes_per_chip'] for x in host['collectives']) / 2**20
  rates = host['images_per_sec']
  slice_rate = lambda mfu: f'{rates[mfu]["per_slice"]:,.0f}' if mfu in rates else ''
  mode = c['shuffle_bn_mode'] if c['shuffle_bn'] else 'off'
  return (f'| {recipe} | {t["name"]} | {c["batch_size"]} ({c["batch_per_device"]}) | '
          f'{mode} | {gib:.1f} / {t["hbm_bytes_per_chip"] / 2**30:.0f}'
          f'{"" if host["fits"] else " ✗"} | {host["flops"] / 1e12:.2f} | {moved:,.1f} | '
          f'{host["roofline_s"]["bound"] * 1e3:.1f} | {slice_rate("0.4")} | '
          f'{slice_rate("0.6")} | |')


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--saved', default='/tmp/pod_plans')
  parser.add_argument('--only', default='')
  args = parser.parse_args()
  os.makedirs(args.saved, exist_ok=True)
  only = set(filter(None, args.only.split(',')))
  print('| recipe | slice | batch (per chip) | shuffle BN | HBM GiB per chip / capacity | '
        'TFLOPs per chip per step | collectives MiB per chip per step | roofline ms '
        '| images/s per slice at 40% MFU | at 60% MFU | measured on hardware |')
  print('|---|---|---|---|---|---|---|---|---|---|---|')
  results = []
  for name, recipe, topology, overrides in ROWS:
    if only and name not in only:
      continue
    result = plan(name, recipe, topology, overrides, args.saved)
    results.append((name, result))
    print(row(name, recipe, result), flush=True)
  for name, result in results:
    host = result.get('programs', {}).get('pretrain (host crops)', {})
    print(json.dumps({'name': name, 'hbm_bytes': host.get('memory', {}).get('total'),
                      'flops': host.get('flops'),
                      'collective_bytes_per_chip': sum(
                          x['bytes_per_chip'] for x in host.get('collectives', []))}))


if __name__ == '__main__':
  main()
