"""A multi-process run that hangs is reported, not waited on: cli_util.wait_all asks each process still
running for its threads' Python stacks (vggjax.parallel.dump_stacks_on_signal, SIGUSR1), kills them all and
names which process hung where."""

import subprocess
import sys

import pytest

import cli_util
from conftest import subprocess_env

# A stand-in for a process stuck in a collective: it installs vggjax's stack dump as a multi-process run
# does, says so, and blocks in a function whose name the report must show.
HANGS = """
import sys, time
from vggjax import parallel
parallel.dump_stacks_on_signal()
def waiting_for_the_other_process():
  print('ready', flush=True)
  time.sleep(600)
if sys.argv[1] == '0':
  waiting_for_the_other_process()
print('process 1 done', flush=True)
"""


def test_a_hung_process_is_named_with_its_stack_and_killed(tmp_path):
  procs = []
  for i in range(2):
    log = tmp_path / f'log{i}.txt'
    with open(log, 'wb') as out:
      procs.append(subprocess.Popen([sys.executable, '-c', HANGS, str(i)], env=subprocess_env(1, cache=False),
                                    stdout=out, stderr=subprocess.STDOUT))
    procs[-1].log = str(log)
  assert cli_util.wait_for(lambda: 'ready' in cli_util.output(procs[0]), procs[0], timeout=120)
  with pytest.raises(AssertionError) as failure:
    cli_util.wait_all(procs, timeout=5)
  report = str(failure.value)
  assert f'process 0 (pid {procs[0].pid}) still running after 5 s' in report
  assert 'waiting_for_the_other_process' in report and 'time.sleep' not in report.split('process 0')[0]
  assert 'process 1 (pid' not in report  # it finished: not named
  assert all(p.poll() is not None for p in procs)  # nothing outlives the test
  assert procs[1].returncode == 0


def test_processes_that_finish_give_their_exit_codes(tmp_path):
  procs = [subprocess.Popen([sys.executable, '-c', f'raise SystemExit({code})']) for code in (0, 3)]
  assert cli_util.wait_all(procs, timeout=60) == [0, 3]
