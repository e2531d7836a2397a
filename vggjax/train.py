"""Training: the loop that trains and evaluates a run, and the model and normalisation of a config.

Plain functions a notebook can import (create_train_state, make_train_step, make_eval_step, evaluate,
train_and_evaluate, warm_start); main.py only parses flags and calls train_and_evaluate. The train state and
the jitted steps are ``vggjax.train_step``, the warm start ``vggjax.warm_start``, the objective of each head
(classify, and the box regressors of Appendix A) ``vggjax.localization_model``'s head objects,
checkpointing ``checkpoints.py``; their names are importable from here too.

The loop (train_and_evaluate) reads as build, restore, loop, close: ``_Run`` builds the run (settings, mesh,
model, steps, data, checkpointer), ``_Run.restore`` gives the latest checkpoint's state or a fresh (or
warm-started) one, ``_Loop.train`` steps, writes log rows (``_LogWindow``), validates (``_Validation``) and
checkpoints, and ``_Loop.close`` waits for the last save. The first fault of a step (a non-finite loss,
gradient or update, kept in the state) stops the run ('stop': all later updates are dropped too, so nothing
after the fault is learnt) or is counted ('skip'), read at each log step.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from typing import TYPE_CHECKING, Any, Callable

import jax
import numpy as np
import optax
from etils import epath

from vggjax import checkpoints, config_lib, localization_model, models, optim, parallel, preemption, rundir
from vggjax import runlog as vlog
from vggjax import settings, tracking
from vggjax.data import pipeline
from vggjax.evaluation.evaluators import EvalInterrupted, ValidationEvaluator  # noqa: F401 - train's names
from vggjax.preprocessing import Normalization
from vggjax.train_step import (FAULTS, TrainState, abstract_train_state,  # noqa: F401 - train's names
                               create_train_state, initial_loss_scale, make_eval_step, make_train_step,
                               per_example_hits, per_example_loss, reset_ema, step_targets)
from vggjax.warm_start import (DEEP_NETS, parse_init_layers, warm_start,  # noqa: F401 - train's names
                               warn_deep_from_scratch)

if TYPE_CHECKING:  # configs are ml_collections ConfigDicts
  import ml_collections

log = logging.getLogger('vggjax')


class NonFiniteError(RuntimeError):
  """The loss or the gradients became NaN or Inf."""


def build_model(config: ml_collections.ConfigDict, **overrides) -> models.VGG:
  m = settings.ModelSettings.from_config(config.model)
  options = dict(num_classes=localization_model.box_outputs(m.head, m.num_classes), width=m.width,
                 fc_features=m.fc_features or None,
                 image_size=settings.DataSettings.from_config(config.data).image_size,
                 dropout_rate=m.dropout_rate, dtype=m.dtype, init=m.init, init_std=m.init_std)
  if m.pool_ceil:
    options['pool_ceil'] = True
  options.update(overrides)
  return models.get_model(m.name, **options)


def normalization(config: ml_collections.ConfigDict) -> Normalization:
  d = settings.DataSettings.from_config(config.data)
  return Normalization.from_rgb(d.mean_rgb, d.std_rgb, d.color_order)


def evaluate(eval_step: Callable, variables: dict, batches, mesh,
             stop: Callable[[], bool] | None = None) -> dict:
  """Top-1/top-5 accuracy and loss over every example of a split (padding masked, never dropped): the
  ValidationEvaluator of `eval_step` over `batches`. `stop` is polled before each batch (host-only, no device
  wait): True raises EvalInterrupted."""
  return ValidationEvaluator(eval_step, mesh, lambda: batches).run(variables, stop=stop)


@dataclasses.dataclass
class RunResult:
  step: int
  epoch: float
  metrics: dict
  preempted: bool = False
  skipped_images: int = 0  # unreadable training images skipped over the whole run (all processes)


@dataclasses.dataclass
class _Run:
  """What one training run is made of: its settings, mesh, model, steps, data, checkpointer and writer."""

  config: Any
  workdir: str
  info: Any  # the dataset's pipeline.DatasetInfo
  data: settings.DataSettings
  t: settings.TrainSettings
  m: settings.ModelSettings
  mesh: Any
  steps_per_epoch: int
  total_steps: int
  model: models.VGG
  tx: optax.GradientTransformation
  schedule: optim.Schedule
  norm: Normalization
  train_step: Callable
  eval_step: Callable
  it: Any  # the training iterator (checkpointable)
  ckpt: checkpoints.TrainCheckpointer
  writer: vlog.MetricWriter

  @classmethod
  def build(cls, config: ml_collections.ConfigDict, workdir: str) -> _Run:
    """Validates and resolves the config, then builds the run (nothing is restored or trained yet)."""
    config_lib.validate(config)
    config_lib.check_init_required(config)
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    info = pipeline.dataset_info(config.data)
    config = config_lib.resolve(config, info.num_classes)
    # The config read once: typed settings below (each default defined in configs/default.py).
    data = settings.DataSettings.from_config(config.data)
    t = settings.TrainSettings.from_config(config.train)
    m = settings.ModelSettings.from_config(config.model)
    mesh = parallel.make_mesh()
    parallel.check_batch_size(t.global_batch_size, mesh)
    steps_per_epoch = rundir.steps_per_epoch(info.num_train, t.global_batch_size)
    if steps_per_epoch == 0:
      raise config_lib.ConfigError(f'config.train.global_batch_size={t.global_batch_size} is larger than '
                                   f'the training split ({info.num_train} examples)')
    total_steps = rundir.total_steps(t.max_steps, t.num_epochs, steps_per_epoch)
    model = build_model(config)
    tx = optim.make_optimizer(config.optimizer, trainable=t.trainable)
    if optim.trainable_patterns(tx):
      optim.check_patterns(list(models.variable_shapes(model)['params']), optim.trainable_patterns(tx))
    parallel.check_batch_size(t.global_batch_size // t.accumulate_steps, mesh)
    norm = normalization(config)
    train_step = make_train_step(model, tx, mesh, norm=norm, color_shift=data.color_shift,
                                 remat=m.remat, nan_policy=t.nan_policy, accumulate_steps=t.accumulate_steps,
                                 eigval=data.pca_eigval, eigvec=data.pca_eigvec, head=m.head,
                                 label_smoothing=t.label_smoothing, ema_decay=t.ema_decay)
    eval_step = make_eval_step(build_model(config, dropout_rate=0.0), mesh, norm, head=m.head)
    it = pipeline.train_iterator(data, global_batch_size=t.global_batch_size,
                                 seed=int(settings.value(config, 'seed')),
                                 process_index=jax.process_index(), process_count=jax.process_count())
    return cls(config=config, workdir=workdir, info=info, data=data, t=t, m=m, mesh=mesh,
               steps_per_epoch=steps_per_epoch, total_steps=total_steps, model=model, tx=tx,
               schedule=optim.Schedule.from_config(config.optimizer, steps_per_epoch, total_steps),
               norm=norm, train_step=train_step, eval_step=eval_step, it=it,
               ckpt=checkpoints.TrainCheckpointer(workdir, keep=t.keep_checkpoints, keep_best=t.keep_best),
               writer=vlog.MetricWriter(workdir, enabled=jax.process_index() == 0, tracker=tracking.start(
                   config, workdir, enabled=jax.process_index() == 0)))

  def restore(self) -> tuple[TrainState, int, dict]:
    """(state, step, host state) of the latest checkpoint, or of a fresh (or warm-started) run at step 0;
    then WORKDIR/config.json is written."""
    start = self.ckpt.latest_step()
    if start is not None:
      abstract = abstract_train_state(self.model, self.tx, self.mesh, ema=bool(self.t.ema_decay),
                                      loss_scale=self.loss_scale)
      state, host = self.ckpt.restore(start, abstract, self.it)
      self.schedule.load_state_dict(host.get('schedule', {}))
      self.writer.truncate_after(start)
      log.info('resumed from %s at step %d', self.ckpt.manager.directory, start)
    else:
      start, host = 0, {}
      warn_deep_from_scratch(self.config)
      state = create_train_state(self.model, self.tx, self.mesh, int(settings.value(self.config, 'seed')),
                                 ema=bool(self.t.ema_decay), loss_scale=self.loss_scale)
      if settings.value(self.config, 'init_from'):
        state = reset_ema(warm_start(state, self.config.init_from, settings.value(self.config, 'init_layers'),
                                     self.mesh, self.norm, model_name=self.m.name))
    if jax.process_index() == 0:
      info = self.info
      config_lib.write(self.config, self.workdir, {
          'labels': info.class_names, 'dataset': {'num_train': info.num_train, 'num_eval': info.num_eval}})
    log.info('%s: %s parameters, %d devices over %d processes, %d steps/epoch, %d steps',
             self.m.name, f'{models.param_count(self.model):,}', self.mesh.devices.size, jax.process_count(),
             self.steps_per_epoch, self.total_steps)
    return state, start, host

  def epoch(self, step: int) -> float:
    return step / self.steps_per_epoch

  @property
  def loss_scale(self) -> float:
    """The initial dynamic loss scale: float16 only (0: none)."""
    return self.t.loss_scale if self.m.dtype == 'float16' else 0.0


class _Validation:
  """Validation during training: the eval step over the eval split, fed to the schedule, kept as history
  (in the checkpoints' host state) and written as a metrics row. With train.ema_decay the EMA parameters
  are evaluated too, beside the trained ones (ema_val_top1, ...; the schedule follows the trained ones)."""

  def __init__(self, run: _Run, history: list[dict], stop: preemption.StopRequest):
    self.run, self.history, self.stop = run, history, stop

  def __call__(self, step: int, state: TrainState) -> dict:
    r, data = self.run, self.run.data
    batches = pipeline.eval_iterator(data, global_batch_size=r.t.global_batch_size,
                                     process_index=jax.process_index(), process_count=jax.process_count())
    log.info('step %d: evaluating on %s', step, data.eval_split)
    result = evaluate(r.eval_step, state.variables, batches, r.mesh, stop=self.stop.in_eval)
    if r.t.ema_decay:
      batches = pipeline.eval_iterator(data, global_batch_size=r.t.global_batch_size,
                                       process_index=jax.process_index(), process_count=jax.process_count())
      ema = evaluate(r.eval_step, state.ema_variables, batches, r.mesh, stop=self.stop.in_eval)
      result.update({f'ema_{k}': v for k, v in ema.items() if k != 'val_count'})
    reduced = r.schedule.on_eval(result['val_top1'])
    row = {'step': step, 'epoch': r.epoch(step), **result, 'lr_reduced': reduced}
    skipped = parallel.sum_over_processes(batches.skipped)
    if skipped:  # unreadable validation images (left out of val_count)
      row['val_skipped_images'] = skipped
    self.history.append(row)
    r.writer.write(row)
    log.info('step %d: val top-1 %.4f, top-5 %.4f (%d images)%s', step, result['val_top1'],
             result['val_top5'], result['val_count'], ' -> lr reduced' if reduced else '')
    return row


class _LogWindow:
  """The training metrics of the steps since the last log row. A closed window is written by ``flush``,
  called after the next step is dispatched, so reading its metrics waits only for the window's last step
  while the device already works on the next one: no bubble."""

  def __init__(self, run: _Run, start: int, skipped_before: int):
    self.run, self.skipped_before = run, skipped_before
    self.steps: list[dict] = []
    self.pending = None  # a closed window: (metrics, end step, lr, images skipped so far on this process)
    self.t_log, self.step_log = time.time(), start
    self.skipped_logged = skipped_before  # unreadable training images up to the last row written
    self.bar = vlog.ProgressBar(run.total_steps, start=start, enabled=jax.process_index() == 0)

  def add(self, metrics: dict, step: int, lr: float) -> None:
    self.steps.append(metrics)
    if step % self.run.t.log_every_steps == 0 or step == self.run.total_steps:
      self.pending, self.steps = (self.steps, step, lr, self.run.it.skipped), []

  def restart_clock(self) -> None:
    """Evaluation time is not training throughput."""
    self.t_log = time.time()

  def flush(self) -> None:
    if self.pending is None:
      return
    r, (metrics, end, lr, skipped_local) = self.run, self.pending
    self.pending = None
    host = parallel.to_host(metrics)
    last = host[-1]
    _raise_fault(int(last['fault']), int(last['fault_step']), r.t.nan_policy)
    now = time.time()
    row = {'step': end, 'epoch': r.epoch(end), 'lr': lr,
           'loss': float(np.mean([m['loss'] for m in host])),
           'train_top1': float(np.mean([m['train_top1'] for m in host])),
           'grad_norm': float(np.mean([m['grad_norm'] for m in host])),
           'img_per_s': (end - self.step_log) * r.t.global_batch_size / max(now - self.t_log, 1e-9)}
    skipped = int(sum(m['skipped'] for m in host))
    if skipped:
      row['skipped_steps'] = skipped
    if 'loss_scale' in last:  # float16: the last step's loss scale, and the steps skipped for an overflow
      row['loss_scale'] = float(last['loss_scale'])
      row['overflow_steps'] = int(sum(m['overflow'] for m in host))
    skipped_total = self.skipped_before + parallel.sum_over_processes(skipped_local)
    if skipped_total > self.skipped_logged:  # unreadable images replaced in this window's batches
      row['skipped_images'] = skipped_total - self.skipped_logged
    self.skipped_logged = skipped_total
    r.writer.write(row)
    self.bar.update(end, epoch=round(row['epoch'], 2), loss=row['loss'], lr=lr,
                    **{'img/s': round(row['img_per_s'], 1)})
    self.t_log, self.step_log = now, end


# jax.profiler's trace kills a process that has PyTorch loaded: a segmentation fault in start_trace or
# stop_trace, whichever was imported first (measured: torch 2.14.1, jax 0.10.2, CPU).
PROFILER_CONFLICTS = ('torch',)


class _Profile:
  """train.profile_steps = n: a jax.profiler trace of steps start+2 .. start+n+1 of this process (the first
  step compiles) in WORKDIR/profile, which TensorBoard's profile tab reads (a gs:// workdir too: the
  profiler writes through TensorFlow's file systems)."""

  def __init__(self, run: _Run, start: int):
    n = run.t.profile_steps
    self.first, self.last = (start + 1, start + 1 + n) if n else (-1, -1)
    self.directory, self.on = rundir.join(run.workdir, 'profile'), False

  def before(self, step: int) -> None:
    if step == self.first and not self.on:
      loaded = [m for m in PROFILER_CONFLICTS if m in sys.modules]
      if loaded:  # the run goes on unprofiled rather than crash
        log.warning('train.profile_steps: not profiled: jax.profiler crashes a process that has %s loaded '
                    '(profile a run whose process does not import it)', ', '.join(loaded))
        self.first = -1
        return
      jax.profiler.start_trace(self.directory)
      self.on = True

  def after(self, step: int, state) -> None:
    if self.on and step >= self.last:
      jax.block_until_ready(state)
      self.stop()
      log.info('profiled steps %d-%d: tensorboard --logdir=%s (the profile tab)', self.first + 1, step,
               self.directory)

  def stop(self) -> None:
    if self.on:
      jax.profiler.stop_trace()
      self.on = False


class _Loop:
  """The training loop over a restored run: steps, log rows, validation and checkpoints, until the last step
  or a preemption."""

  def __init__(self, run: _Run, state: TrainState, start: int, host: dict):
    self.run, self.state, self.start, self.step = run, state, start, start
    self.skipped_before = int(host.get('skipped_images', 0))  # skipped before this process started
    self.pending_eval = bool(host.get('pending_eval'))  # preempted during this step's evaluation: again
    self.preempted, self.last_eval = False, None
    self.stop = preemption.StopRequest()
    self.stop.attach(run.ckpt.manager)  # Orbax's own preemption queries would break the sync point ids
    self.validate = _Validation(run, host.get('evals', []), self.stop)
    self.window = _LogWindow(run, self.start, self.skipped_before)
    self.profile = _Profile(run, start)

  def skipped_images(self) -> int:
    """Unreadable training images skipped so far in the run (all processes; the same point on each)."""
    return self.skipped_before + parallel.sum_over_processes(self.run.it.skipped)

  def host_state(self) -> dict:
    return {'schedule': self.run.schedule.state_dict(), 'evals': self.validate.history,
            'epoch': self.run.epoch(self.step), 'pending_eval': self.pending_eval,
            'skipped_images': self.skipped_images()}

  def resume_eval(self) -> None:
    """The evaluation a preemption interrupted: the schedule must see it."""
    try:
      self.last_eval = self.validate(self.step, self.state)
      self.pending_eval = False
      self.run.ckpt.resave(self.step, self.state, self.run.it, self.host_state(), metrics=self.last_eval)
    except EvalInterrupted:
      self.preempted = True
      log.warning('stopped during the evaluation of step %d for preemption; the same command resumes',
                  self.step)

  def train(self) -> None:
    r, t = self.run, self.run.t
    eval_every = t.eval_every_steps or r.steps_per_epoch
    if self.pending_eval:
      self.resume_eval()
    while self.step < r.total_steps and not self.preempted:
      batch = parallel.global_batch(next(r.it), r.mesh)
      lr = r.schedule.lr(self.step)
      self.profile.before(self.step)
      self.state, metrics = r.train_step(self.state, batch, np.float32(lr))
      self.step = step = self.step + 1
      self.profile.after(step, self.state)
      if step == self.start + 1:  # a marker for whoever waits for the loop (the signal handler is installed)
        log.info('training started at step %d', self.start)
      self.window.flush()
      self.window.add(metrics, step, lr)
      evaluate_now = step % eval_every == 0 or step == r.total_steps
      self.preempted = self.stop.requested(step)
      epoch_end = t.checkpoint_every_epoch and step % r.steps_per_epoch == 0
      save_now = (step % t.checkpoint_every_steps == 0 or epoch_end or step == r.total_steps
                  or self.preempted)
      if evaluate_now or save_now:  # both wait for the device anyway
        self.window.flush()
      if evaluate_now:
        try:
          self.last_eval = self.validate(step, self.state)
        except EvalInterrupted:  # checkpoint without it; the resumed run evaluates this step first
          self.pending_eval = self.preempted = save_now = True
          log.warning('evaluation of step %d interrupted by a preemption notice', step)
        self.window.restart_clock()
      if save_now:
        _check_faults(self.state, t.nan_policy)
        r.ckpt.save(step, self.state, r.it, self.host_state(),
                    metrics=self.last_eval if evaluate_now and not self.pending_eval else None)
        r.writer.flush()  # on gs://, where rows are uploaded in batches: every row up to the checkpoint
      if self.preempted:
        log.warning('stopped at step %d for preemption; the same command resumes', step)
        break

  def close(self) -> None:
    self.profile.stop()
    self.run.ckpt.close()
    self.window.bar.close()
    self.stop.restore()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> RunResult:
  """Trains (or resumes) the run in `workdir` and evaluates it as it goes. Returns the last metrics."""
  run = _Run.build(config, workdir)
  loop = _Loop(run, *run.restore())
  try:
    loop.train()
  finally:
    loop.close()
  if jax.process_index() == 0 and run.t.plot and not loop.preempted:
    vlog.plot_curves(workdir)
  run.writer.close()
  return RunResult(step=loop.step, epoch=run.epoch(loop.step), metrics=loop.last_eval or {},
                   preempted=loop.preempted, skipped_images=loop.skipped_images())


def _check_faults(state: TrainState, policy: str) -> None:
  fault, at = (int(x) for x in jax.device_get((state.fault, state.fault_step)))
  _raise_fault(fault, at, policy)


def _raise_fault(fault: int, at: int, policy: str) -> None:
  if fault and policy == 'stop':
    raise NonFiniteError(
        f'non-finite {FAULTS[fault]} at step {at} (the update of step {at} and later were not applied); '
        f'the last good checkpoint is kept. Lower optimizer.lr, or set train.nan_policy=skip to drop such '
        f'steps and go on.')
