"""Names a rank that dies without a word (SIGKILL, the out-of-memory killer, a crash).

A process killed that way cannot report itself, and the MPI launcher's clean-up ends every
other rank, rank 0 included, before rank 0 can notice the failure; the launcher's own
message names a pid at best. So each process that ``mpiexec``/``srun`` starts for
``elfish-mpi train`` is a small supervisor: it runs the real rank as its child (the same
command line), forwards the stop signals to it, and waits. The rank tells it over a pipe
who it is and what it is doing ("worker rank 2", "in round 3"), and ``release`` before an
exit it makes on its own terms (MPI_Abort after an error it has reported). When the rank
ends by a signal instead, the supervisor, being its parent, knows which one, prints

    elfish-mpi: error: worker rank 2 (pid 4242 on node7) was killed by signal 9 (SIGKILL): by a
    person, the batch system or the out-of-memory killer in round 3

and then ends by the same signal, so that the launcher sees what it would have seen
without it and cleans up the job. The launcher cannot notice the death before the
supervisor has spoken, and when it kills the other ranks it kills their supervisors with
them (same process group), so only the rank that died first is named. A signal that came
to the supervisor too (a Ctrl-C or SIGHUP that the launcher sends every process) is passed
on and is no news: the supervisor then ends by it without a message.

The supervisor never imports MPI or torch. The rank dies with its supervisor
(``PR_SET_PDEATHSIG``). ``ELFISH_SUPERVISE=0`` in the environment runs the rank directly.
"""
from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import threading

ENV_FD = "ELFISH_SUPERVISOR_FD"  # set for the rank: the pipe it writes its notes to
ENV_PID = "ELFISH_SUPERVISOR_PID"
RELEASE = b"release"
# Signals the rank handles itself (signals.py) or that end it as they would have without a
# supervisor; an MPI launcher or SLURM sends them to the process it started.
FORWARD = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)

_fd: int | None = None


# ------------------------------------------------------------------ the supervisor


def wanted() -> bool:
    """True in a process that should supervise: not the rank itself, not turned off, and
    not one that has initialized MPI already (importing mpi4py.MPI does): that one is a rank."""
    return (ENV_FD not in os.environ and os.environ.get("ELFISH_SUPERVISE", "1") != "0"
            and "mpi4py.MPI" not in sys.modules)


def run(argv: list[str] | None = None) -> int:
    """Run this process's command line again as a child and wait for it. Returns the child's
    exit code; a child ended by a signal is reported, then this process ends by that signal."""
    argv = list(sys.orig_argv if argv is None else argv)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # an ignored SIGCHLD (inherited) hides exit codes
    read_end, write_end = os.pipe()
    os.set_inheritable(write_end, True)
    env = dict(os.environ, **{ENV_FD: str(write_end), ENV_PID: str(os.getpid())})
    # The child is born with the stop signals blocked (a signal mask survives fork and exec)
    # and unblocks them once its handlers are in place: a signal forwarded before that waits.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARD)
    try:
        # close_fds=False: the launcher's descriptors (PMI's socket among them) go to the rank.
        child = subprocess.Popen([sys.executable, *argv[1:]], env=env, close_fds=False)
    except Exception as exc:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        os.close(read_end)
        _say(f"elfish-mpi: error: cannot start the rank ({exc}); ELFISH_SUPERVISE=0 runs it without a supervisor")
        return 2
    finally:
        os.close(write_end)
    received: set[int] = set()  # signals that came to this process and were passed on

    def forward(signum, frame):
        received.add(signum)
        try:
            child.send_signal(signum)
        except OSError:
            pass

    # The notes are read in a thread (a process forked by the rank may hold the pipe open
    # after the rank has died, so its end of file cannot be what this process waits for).
    # Started while the stop signals are blocked, the thread keeps them blocked: they go to
    # the main thread, whose wait they interrupt, and whose handler passes them on.
    notes = _Notes(read_end, default_who())
    for sig in FORWARD:
        signal.signal(sig, forward)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    code = child.wait()
    notes.join()
    if code >= 0 or notes.released:
        for sig in FORWARD:  # the rank's verdict is in: a late stop signal must not replace it
            signal.signal(sig, signal.SIG_IGN)
        return code if code >= 0 else 128 - code
    sig = -code
    if sig not in received:  # (a signal sent to every process of the job is no news)
        _say(f"elfish-mpi: error: {notes.who} (pid {child.pid} on {socket.gethostname()}) was {_how(sig)} {notes.where}")
    _die_by(sig)
    return 128 + sig  # not reached


class _Notes(threading.Thread):
    """Reads the rank's notes ("who ...", "at ...", "release") until the pipe closes."""

    def __init__(self, fd: int, who: str):
        super().__init__(name="elfish-supervisor-notes", daemon=True)
        self.fd, self.who, self.where, self.released = fd, who, "during start-up", False
        self.start()

    def run(self) -> None:
        buf = b""
        with os.fdopen(self.fd, "rb", buffering=0) as pipe:
            while chunk := pipe.read(4096):
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    key, _, value = line.partition(b" ")
                    text = value.decode("utf-8", "replace")
                    if key == b"who":
                        self.who = text
                    elif key == b"at":
                        self.where = text
                    elif line == RELEASE:
                        self.released = True

    def join(self, timeout: float = 1.0) -> None:
        """Wait for the notes the rank wrote before it ended (they are in the pipe already)."""
        super().join(timeout)


LAUNCHER_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID", "MV2_COMM_WORLD_RANK", "PALS_RANKID")


def launcher_rank() -> int | None:
    """The rank as the launcher numbered it (MPICH, Open MPI, PMIx, SLURM, MVAPICH, PALS), or None."""
    for var in LAUNCHER_RANK_VARS:
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return None


def default_who() -> str:
    """The rank as the launcher numbered it, for a death before the rank has said who it is."""
    rank = launcher_rank()
    return f"rank {rank}" if rank is not None else "an elfish-mpi process"


def _say(line: str) -> None:
    try:
        print(line, file=sys.stderr, flush=True)
    except OSError:  # the launcher's end of stderr is gone
        pass


def _how(sig: int) -> str:
    try:
        name = signal.Signals(sig).name
    except ValueError:
        name = "?"
    text = f"killed by signal {sig} ({name})"
    if sig == signal.SIGKILL:
        text += ": by a person, the batch system or the out-of-memory killer"
    elif sig in (signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT):
        text += ": a crash in native code"
    return text


def _die_by(sig: int) -> None:
    """End this process by ``sig``, as the rank ended (no core file of the supervisor)."""
    sys.stdout.flush()
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if sig not in (signal.SIGKILL, signal.SIGSTOP):  # (those two cannot be caught or blocked)
        signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
    os.kill(os.getpid(), sig)
    os._exit(128 + sig)  # a signal that does not end a process by default


# ------------------------------------------------------------------ the rank


def attach() -> None:
    """In the rank: take the pipe to the supervisor (if any), die with the supervisor, and let
    the stop signals through (call after installing their handlers)."""
    global _fd
    if ENV_FD in os.environ:
        try:
            fd, parent = int(os.environ.pop(ENV_FD)), int(os.environ.pop(ENV_PID, "0"))
            os.set_inheritable(fd, False)  # not to processes this rank starts
        except (ValueError, OSError):  # not a pipe from a supervisor: run unsupervised
            fd = None
        if fd is not None:
            _die_with_parent()
            if os.getppid() != parent:  # the supervisor was gone before the line above
                print(f"elfish-mpi: error: rank process {os.getpid()}: its supervisor (pid {parent}) is gone",
                      file=sys.stderr, flush=True)
                os._exit(1)
            _fd = fd
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARD)


def _die_with_parent() -> None:
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _send(line: bytes) -> None:
    global _fd
    if _fd is None:
        return
    try:
        os.write(_fd, line.replace(b"\n", b" ") + b"\n")
    except OSError:
        _fd = None


def identify(who: str) -> None:
    """Who this rank is, e.g. ``worker rank 2``; the supervisor adds the pid and host."""
    _send(b"who " + who.encode("utf-8", "replace"))


def note(where: str) -> None:
    """What this rank is doing, as the end of a sentence: ``in round 3``."""
    _send(b"at " + where.encode("utf-8", "replace"))


def release() -> None:
    """This rank ends on its own terms (it has said why): do not report its death."""
    _send(RELEASE)
