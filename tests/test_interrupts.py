"""Ctrl-C while the main thread waits inside XLA for a slow step.

tests/slow_step_cli.py runs the real pretraining CLI with a host callback
that sleeps in every step, so the main thread sits in a device wait (where
Python runs no signal handler) as on a slow CPU. The callback logs each
step's number as it starts, which tells the test which step is running.
"""
import os
import signal
import subprocess
import time

from cli_runner import python
from conftest import REPO, TINY_DATASET
from moco_jax.runtime import checkpointing
from moco_jax.runtime.preemption import StopRequests


def start_slow_run(workdir, data_dir, seconds_per_step, log):
  """The smoke config for 1000 steps, logging and checkpointing rarely, so
  nothing but the loop's own waiting keeps the host in step with the device."""
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env.update(SLOW_STEP_SECONDS=str(seconds_per_step), SLOW_STEP_LOG=str(log))
  command = [*python(), os.path.join('tests', 'slow_step_cli.py'),
             '--config=configs/smoke.py', f'--workdir={workdir}',
             f'--config.data.dataset={TINY_DATASET}', f'--config.data.data_dir={data_dir}',
             '--config.train.num_steps=1000', '--config.train.log_every=500',
             '--config.train.checkpoint_every=500']
  return subprocess.Popen(command, cwd=REPO, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def running_step(log):
  """The newest step whose callback started, 0 before any."""
  if not os.path.exists(log):
    return 0
  with open(log) as f:
    steps = [int(line) for line in f if line.strip()]
  return steps[-1] if steps else 0


def wait_for_step(process, log, step, timeout=240):
  deadline = time.time() + timeout
  while running_step(log) < step:
    assert process.poll() is None, process.communicate()[1][-3000:]
    assert time.time() < deadline, f'step {step} never started'
    time.sleep(0.01)
  return running_step(log)


def test_ctrl_c_during_a_slow_step_saves_that_step(tiny_data_dir, tmp_path):
  workdir, log = tmp_path / 'run', tmp_path / 'steps.log'
  process = start_slow_run(workdir, tiny_data_dir, 2.0, log)
  step = wait_for_step(process, log, 3)
  sent = time.time()
  process.send_signal(signal.SIGINT)
  stdout, stderr = process.communicate(timeout=120)
  waited = time.time() - sent
  assert process.returncode == 0, stderr[-3000:]
  saved = checkpointing.Checkpointer(str(workdir)).all_steps()
  # The step that was running when Ctrl-C came (its callback started just
  # before); a loop that let the host run ahead would save a later one.
  assert saved == [step], (saved, step)
  assert f'SIGINT: saved step {step}' in stdout + stderr
  assert running_step(log) == step                  # no further step started
  assert waited < 60, waited                        # one 2 s step, the save, exit
  assert 'Traceback' not in stderr


def test_second_ctrl_c_exits_at_once_with_one_line(tiny_data_dir, tmp_path):
  workdir, log = tmp_path / 'run', tmp_path / 'steps.log'
  process = start_slow_run(workdir, tiny_data_dir, 30.0, log)
  wait_for_step(process, log, 1)
  process.send_signal(signal.SIGINT)
  time.sleep(0.5)
  sent = time.time()
  process.send_signal(signal.SIGINT)
  stdout, stderr = process.communicate(timeout=60)
  waited = time.time() - sent
  assert process.returncode == 130, stderr[-3000:]
  assert waited < 15, waited                        # not the 30 s step's end
  lines = [line for line in stderr.splitlines() if line.strip()]
  errors = [line for line in lines if line.startswith('error:')]
  assert len(errors) == 1 and errors[0] == lines[-1], stderr[-3000:]
  assert 'interrupted twice' in errors[0] and str(workdir) in errors[0]
  assert 'Traceback' not in stderr and 'KeyboardInterrupt' not in stderr
  assert not checkpointing.Checkpointer(str(workdir)).all_steps()


def test_stop_requests_in_python_raise_on_the_second_ctrl_c():
  """For Python callers (notebooks) the process survives: the second SIGINT
  raises KeyboardInterrupt instead of exiting; handlers are restored."""
  before = signal.getsignal(signal.SIGINT)
  with StopRequests() as stop:
    os.kill(os.getpid(), signal.SIGTERM)
    deadline = time.time() + 5
    while not stop.requested and time.time() < deadline:
      time.sleep(0.01)
    assert stop.signal_name == 'SIGTERM'
    try:
      os.kill(os.getpid(), signal.SIGINT)
      for _ in range(500):
        time.sleep(0.01)                                # the handler runs here
      raised = False
    except KeyboardInterrupt:
      raised = True
  assert raised
  assert signal.getsignal(signal.SIGINT) is before


# A process that asks for a stop 20 times, each time with one SIGINT that
# arrives while the main thread runs Python code (where both the Python
# handler and the wakeup-fd watcher see the same signal).
_BUSY_ROUNDS = '''
import sys, time
from moco_jax.runtime.preemption import StopRequests
rounds, save_seconds = int(sys.argv[1]), float(sys.argv[2])
for round_ in range(rounds):
  with StopRequests('exit', 'error: interrupted twice', announce=True) as stop:
    print('ready', flush=True)
    total = 0
    while not stop.requested:
      total += sum(range(200))
    saving_until = time.time() + save_seconds   # a slow save, also Python work
    while time.time() < saving_until:
      total += sum(range(200))
    print(f'saved {round_}', flush=True)
'''


def test_one_ctrl_c_during_python_work_is_one_stop_request_20_times():
  rounds = 20
  env = dict(os.environ, PYTHONPATH=REPO)
  process = subprocess.Popen([*python(), '-c', _BUSY_ROUNDS, str(rounds), '0'],
                             env=env, text=True, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
  saved = 0
  for round_ in range(rounds):
    if process.stdout.readline().strip() != 'ready':
      break
    time.sleep(0.05)                                  # well inside the busy loop
    process.send_signal(signal.SIGINT)
    if process.stdout.readline().strip() != f'saved {round_}':
      break
    saved += 1
  process.stdout.close()
  stderr = process.stderr.read()
  assert process.wait(timeout=60) == 0, stderr[-2000:]
  assert saved == rounds, stderr[-2000:]
  noted = [line for line in stderr.splitlines() if line.strip()]
  assert len(noted) == rounds and all(
      line.startswith('SIGINT: stop noted; the run finishes the current step, saves')
      for line in noted), stderr[-2000:]


def test_two_ctrl_c_during_python_work_still_exit_130_at_once():
  env = dict(os.environ, PYTHONPATH=REPO)
  process = subprocess.Popen([*python(), '-c', _BUSY_ROUNDS, '1', '60'],
                             env=env, text=True, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
  assert process.stdout.readline().strip() == 'ready'
  process.send_signal(signal.SIGINT)
  time.sleep(0.5)                                     # now in the 60 s save
  sent = time.time()
  process.send_signal(signal.SIGINT)
  stdout, stderr = process.communicate(timeout=60)
  assert process.returncode == 130, stderr[-2000:]
  assert time.time() - sent < 10
  assert 'saved' not in stdout and 'Traceback' not in stderr
  lines = [line for line in stderr.splitlines() if line.strip()]
  assert lines[0].startswith('SIGINT: stop noted') and lines[-1] == 'error: interrupted twice'
