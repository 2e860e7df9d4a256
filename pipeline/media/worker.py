"""``DecodeWorker``: ``decode()`` in a killable child process (timeout, crash, memory cap)."""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
from collections.abc import Callable

from PIL import ImageFile

from pipeline.media.dispatch import _check_size, _memory_message, decode
from pipeline.media.types import Decoded, MediaError, MediaOptions

_START_TIMEOUT_S = 60.0  # a decoder process that has not said "ready" by then is broken
_EXIT_OUT_OF_MEMORY = 75  # the child's exit status when even receiving a request ran out of memory


DecodeFn = Callable[[bytes, str, MediaOptions], Decoded]


class DecodeWorker:
    """Runs ``decode`` in a child process reused across calls; the caller never hangs or dies.

    A call that takes longer than ``options.timeout_s`` gets the child SIGKILLed and raises ``decode_timeout``;
    a child that dies (segfault, abort, exit) raises ``decode_crashed``; either way the next call starts a
    fresh child. The child's address space is capped at ``options.max_memory_mb`` (RLIMIT_AS), so a file
    that needs more raises ``too_large`` instead of swapping the machine.

    ``start_method``: "forkserver" (default) or "spawn", never "fork". A Ray worker process runs threads
    (gRPC, the core worker, maybe OpenMP pools); forking it copies whatever locks those threads held at that
    instant into a child where nobody will release them (malloc, logging, decord #294), a deadlock.
    "forkserver" starts one clean single-threaded server process once (it imports this module up front)
    and forks every decoder child from it, so restarting a child after a kill is quick (no re-import of
    numpy, Pillow and FFmpeg).
    "spawn" is as safe but each (re)start imports numpy, Pillow and FFmpeg again (about a second).

    ``_decode_fn`` is for tests only: a picklable module-level function used instead of ``decode``.
    """

    def __init__(
        self,
        options: MediaOptions = MediaOptions(),  # noqa: B008 (frozen dataclass)
        start_method: str = "forkserver",
        _decode_fn: DecodeFn | None = None,
    ) -> None:
        if start_method not in ("forkserver", "spawn"):
            raise ValueError(f"DecodeWorker start_method = {start_method!r} is invalid: 'forkserver' or 'spawn'")
        self.options = options
        self.start_method = start_method
        self._decode_fn = _decode_fn or decode
        self._context = multiprocessing.get_context(start_method)
        if start_method == "forkserver":
            # Only matters before the server starts: then it imports us once, and children are forked warm.
            self._context.set_forkserver_preload([__name__])
        self._process = None
        self._connection = None
        self._lock = threading.Lock()  # one request at a time on the pipe
        self.restarts = 0  # children killed or found dead so far (for monitoring)

    def __reduce__(self):
        # Shipped to another process (a Ray actor or task), a worker travels as its settings; it starts its
        # own child there on first use.
        custom = self._decode_fn if self._decode_fn is not decode else None
        return DecodeWorker, (self.options, self.start_method, custom)

    def __enter__(self) -> DecodeWorker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def decode(self, data: bytes, name: str) -> Decoded:
        """``decode(data, name, options)`` in the child process; raises ``MediaError``."""
        _check_size(data, self.options)  # cheap, and spares shipping an oversized file to the child
        with self._lock:
            if self._process is None or not self._process.is_alive():
                self._start()
            answered = False
            try:
                self._connection.send((data, name))
                ready = multiprocessing.connection.wait(
                    [self._connection, self._process.sentinel], timeout=self.options.timeout_s
                )
                if not ready:
                    self._stop(kill=True)
                    raise MediaError(
                        "decode_timeout",
                        f"decoding took longer than {self.options.timeout_s:g} s (timeout_s); the decoder was killed",
                    )
                reply = self._connection.recv() if self._connection in ready else None
                answered = True
            except (EOFError, OSError):  # the pipe broke: the child died while reading or answering
                reply, answered = None, True
            finally:
                if not answered and self._process is not None:
                    # Interrupted while the child works (KeyboardInterrupt, ...): its late answer would be
                    # read as the next call's, so it must not live on.
                    self._stop(kill=True)
            if reply is None:
                raise self._crashed()
        if reply[0] == "ok":
            return reply[1]
        raise MediaError(reply[1], reply[2])

    def close(self) -> None:
        """Stop the child process (a later ``decode`` would start a new one)."""
        with self._lock:
            self._stop(kill=False)

    def _start(self) -> None:
        parent, child = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=_child_main,
            args=(child, self.options, self._decode_fn, self.start_method),
            name="media-decoder",
            daemon=True,
        )
        process.start()
        child.close()  # the child's end lives in the child only, so its death reads as EOF here
        self._process, self._connection = process, parent
        # Start-up (imports under "spawn") must not eat into the first item's timeout: wait for "ready".
        try:
            ready = parent.poll(_START_TIMEOUT_S) and parent.recv() == "ready"
        except (EOFError, OSError):
            ready = False
        if not ready:
            self._stop(kill=True)
            raise MediaError(
                "decode_crashed",
                f"the decoder process failed to start ({self.start_method}); note that it imports the main "
                "module again, which must guard its work with `if __name__ == '__main__':`",
            )

    def _crashed(self) -> MediaError:
        process = self._process
        process.join(5)
        code = process.exitcode
        self._stop(kill=True)
        if code == _EXIT_OUT_OF_MEMORY:
            return MediaError("too_large", _memory_message(self.options))
        if code is not None and code < 0:
            try:
                signame = signal.Signals(-code).name
            except ValueError:
                signame = f"signal {-code}"
            why = " (killed from outside, often by the out-of-memory killer)" if -code == signal.SIGKILL else ""
            return MediaError(
                "decode_crashed",
                f"the decoder process died with signal {signame}{why} while decoding this file; "
                "the decoding library crashed on it",
            )
        return MediaError(
            "decode_crashed", f"the decoder process exited unexpectedly (exit code {code}) while decoding"
        )

    def _stop(self, kill: bool) -> None:
        process, connection = self._process, self._connection
        self._process = self._connection = None
        if process is None:
            return
        if kill:
            self.restarts += 1
        else:
            try:
                connection.send(None)  # "exit": lets the child leave cleanly
            except (OSError, ValueError):
                pass
            process.join(2)
        if process.is_alive():
            process.kill()  # SIGKILL: a child spinning in C holding the GIL ignores everything else
        process.join(5)
        connection.close()


def _child_main(connection, options: MediaOptions, decode_fn: DecodeFn, start_method: str) -> None:
    """The decoder process: answer (data, name) requests until told to stop or the parent goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it then stops us
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # whatever the re-imported main module did: truncated is an error
    _die_with_parent(start_method)
    if options.max_memory_mb is not None:
        import resource

        cap = options.max_memory_mb << 20
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    connection.send("ready")
    while True:
        try:
            request = connection.recv()
        except EOFError:  # the parent is gone
            return
        except MemoryError:  # the request did not fit under the cap; the pipe is now mid-message
            os._exit(_EXIT_OUT_OF_MEMORY)
        if request is None:
            return
        data, name = request
        del request
        try:
            reply = ("ok", decode_fn(data, name, options))
        except MediaError as e:
            reply = ("error", e.kind, e.message)
        except MemoryError:
            reply = ("error", "too_large", _memory_message(options))
        except Exception as e:  # decode() maps its own failures; this is a non-standard decode_fn
            reply = ("error", "corrupt", f"decoding failed: {type(e).__name__}: {e}")
        del data
        try:
            connection.send(reply)
        except MemoryError:  # pickling the frames did not fit
            connection.send(("error", "too_large", _memory_message(options)))


def _die_with_parent(start_method: str) -> None:
    """Make sure a decoder stuck in C does not outlive the process that started it."""
    if start_method == "forkserver":
        # CPython hands every forkserver child a copy of the write end of the server's "alive" pipe; the
        # server exits when that pipe closes, which never happens while a hung child holds a copy. Drop ours:
        # then the server exits with the worker process, and PR_SET_PDEATHSIG below kills us with it.
        try:
            from multiprocessing import forkserver

            server = forkserver._forkserver
            if server._forkserver_alive_fd is not None:
                os.close(server._forkserver_alive_fd)
                server._forkserver_alive_fd = None
        except Exception:
            pass
        try:  # Linux: SIGKILL us when our parent (the single-threaded server) exits
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except Exception:
            pass
    else:
        # Under spawn our parent is the worker process itself, and PR_SET_PDEATHSIG would fire when the
        # *thread* that started us exits, not the process. Poll instead; this cannot stop a loop that holds
        # the GIL, only everything else.
        parent = os.getppid()

        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, name="media-decoder-watchdog", daemon=True).start()
