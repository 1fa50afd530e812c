"""Every fixed interval and timeout of dalishare, in one place. Imports nothing; any room may use it.

The user-facing ones (``--heartbeat-timeout``, ``--stall-timeout``, ``attach_timeout``,
``batch_timeout``, ``heartbeat_interval``, ``reconnect_timeout``) are options, with their defaults in
`producer.options.ServeOptions` and `DaliShareIterator`'s signature.
"""

# -- producer -------------------------------------------------------------------------------------

REAP_INTERVAL_S = 0.25
"""How often the serve loop looks for dead jobs, silent jobs and stalls."""

IDLE_POLL_MS = 50
"""How long the serve loop waits for a control message when it cannot produce."""

DEVICE_UNMAP_LIMIT_S = 10.0
"""How long a stopping producer waits for the jobs that map its GPU memory (a device ring or a GPU
cache) to unmap it (a job does at its next call into the iterator after ``Stop``, once its GPU reads
are done and no view of it is live) or die. Memory still mapped then is never freed by the producer
but left to the driver at its exit (NOTE [ Producer shutdown ]). Below docker stop's 10 s grace plus
the teardown's other waits only if the jobs cooperate; give containers --stop-timeout 40. A job that
is done reading should close its iterator (or leave its ``with`` block) before a long evaluation:
until it calls into the iterator again it cannot hear the ``Stop``."""

SHUTDOWN_LIMIT_S = 40
"""Once its serve loop ends (done, failed, or SIGINT/SIGTERM), the longest a producer's teardown may
take before it prints where it hangs and exits. Above the sum of its bounded waits: DEVICE_UNMAP_LIMIT_S,
WORKER_QUIT_S, STAGE_REAP_S, CONTEXT_TERM_GRACE_S plus the channel's linger, METRICS_STOP_S."""

CONTEXT_TERM_GRACE_S = 2.0
"""How much longer than its socket's linger a stopping producer waits for its ZeroMQ context to
terminate before it goes on without it."""

STARTING_REPEAT_S = 2.0
"""How often a starting producer tells the jobs that wait for it that it is still starting (each
``Starting`` re-arms a job's attach timeout)."""

STAGE_TIMEOUT_S = 60.0
"""Default of ``--stage-timeout``: a stage worker with work outstanding that sends nothing for this
long is killed and replaced; a probe that spends this long on one file blames it. Long enough for a
first batch (DALI's import, a GPU warming up) and a batch of big images on a slow machine."""

WORKER_QUIT_S = 2.0
"""How long a stopping producer waits for its stage worker to leave after ``Quit`` before SIGKILL."""

STAGE_REAP_S = 10.0
"""How long the producer waits for a SIGKILLed stage process to be gone (a GPU context may take a
while to tear down); one stuck longer in the kernel is left to be reaped when it returns."""

RESTART_BACKOFF_S = 0.5
"""The first pause before restarting a stage worker whose failure no file explained; it doubles
with each further such failure in a row (producer/restarts.py)."""

STATUS_RATE_WINDOW_S = 10.0
"""Rates in status, metrics and the serve line (decoded/s, each job's images/s) are over this window."""

STATUS_LOG_INTERVAL_S = 30.0
"""When serve's output is not a terminal (or with --log-format json), how often it logs a status line."""

STATUS_LIVE_REFRESH_S = 1.0
"""How often serve's live line on a terminal, and the snapshot --metrics-port serves, are refreshed."""

METRICS_STOP_S = 5.0
"""How long a stopping producer waits for its metrics HTTP thread to end."""

STATUS_TIMEOUT_S = 2.0
"""How long ``dalishare status`` waits for a producer's answer before it reports it unresponsive."""

# -- stage processes ------------------------------------------------------------------------------

STAGE_IDLE_POLL_S = 1.0
"""How long a stage worker with nothing scheduled waits for a message before it checks again."""

STAGE_SETUP_WAIT_S = 60.0
"""How long a stage process waits for its first message (``Setup`` or ``Probe``) before it exits."""

# -- job ------------------------------------------------------------------------------------------

PRODUCER_POLL_S = 0.2
"""How often a job that waits (to attach, for a batch, for a producer to go) checks that its
producer is still alive."""

STARTING_SILENCE_S = 10.0
"""After a ``Starting``, how long a job waits for the next one (or the ``Welcome``) before it gives
up, if its ``attach_timeout`` is shorter: several STARTING_REPEAT_S."""

GPU_EVENT_POLL_MS = 1
"""How often a waiting job polls the CUDA events of the slots its GPU still reads."""

GPU_WAIT_POLL_S = 50e-6
"""Between event queries while a job must wait for its GPU before reading a new slot."""

HEARTBEAT_JOIN_S = 5
"""How long closing a job waits for its heartbeat thread to end."""

CACHE_POLL_S = 0.002
"""How often a job reading a cache looks at the mark of a sample it waits for (the fill is under way):
a job's wait at most this much longer than the fill."""

DEAD_JOB_DRAIN_MS = 50
"""When the producer finds a job's process gone, it first takes in the messages still on their way
for this long: a job that sent ``EpochDone`` and ``Bye`` and exited at once left, it did not die."""
