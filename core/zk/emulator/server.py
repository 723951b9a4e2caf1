"""The emulator's server: sockets, threads, live punches and the faults it can
play (dropped or stalled connections, delays, silence)."""

import codecs
import logging
import queue
import random
import selectors
import socket
import struct
import threading
import time
from datetime import datetime, timedelta

from core.zk.emulator.generate import next_punch_of
from core.zk.emulator.session import (
    _ClientGone,
    _Session,
    _Stalled,
)
from core.zk.emulator.state import (
    AttendanceRecord,
    DeviceState,
    _check_int,
)
from core.zk.emulator.wire import (
    EF_ATTLOG,
    RECORD_SIZES,
    TCP_MAGIC,
    _TcpFrames,
)

logger = logging.getLogger(__name__)


POLL_INTERVAL = 0.05
# A peer that stops reading mid-transfer gets its connection closed after this.
SEND_TIMEOUT = 60.0
MAX_TCP_CLIENTS = 64
MAX_UDP_PEERS = 64
UDP_PEER_IDLE = 600.0
UDP_QUEUE_DEPTH = 64
JOIN_TIMEOUT = 5.0


# --- The emulator -------------------------------------------------------------------


class ZKEmulator:
    """Serves a DeviceState over TCP and UDP on one port until stop().

    `comm_key` None uses the state's key. `encoding` is the code page user
    names are stored in (UTF-8 on current firmware). `record_size` picks the
    attendance record layout (8, 16, 40 or 49 bytes) on both transports; None
    serves 40 over TCP and 16 over UDP.

    Faults: `drop_after_bytes` resets a TCP connection once that many bytes were
    sent on it, `stall_after_bytes` stops sending there but keeps the connection
    open (a hung device), `delay_ms` sleeps before every reply, `silent` reads
    everything and answers nothing. `punch_during_read`: someone punches right
    after each GET_FREE_SIZES reply and between the 1504 chunks of a bulk read;
    while the clock is disabled the punch is refused and made again the moment
    it is enabled, unless `ignore_disable` (firmware that records while
    disabled). `live_interval` seconds: while the device is enabled, a random
    user punches that often, whether or not a client listens; the punch goes
    into the log and to every client registered for attendance events.
    `clock_offset` seconds is added to this computer's clock to make the
    device clock.
    """

    def __init__(
        self,
        state: DeviceState,
        host: str = "127.0.0.1",
        port: int = 0,
        comm_key: int | None = None,
        chunked: bool = False,
        drop_after_bytes: int | None = None,
        stall_after_bytes: int | None = None,
        delay_ms: float = 0,
        silent: bool = False,
        live_interval: float | None = None,
        clock_offset: float = 0.0,
        encoding: str = "utf-8",
        record_size: int | None = None,
        punch_during_read: bool = False,
        ignore_disable: bool = False,
    ):
        self.state = state
        try:
            codecs.lookup(encoding)
        except LookupError:
            raise ValueError(f"encoding: unknown encoding {encoding!r}") from None
        self.encoding = encoding
        if record_size is not None and record_size not in RECORD_SIZES:
            raise ValueError(
                f"record_size: expected one of {', '.join(map(str, RECORD_SIZES))}, "
                f"got {record_size!r}"
            )
        self._record_size = record_size
        self.punch_during_read = punch_during_read
        self.ignore_disable = ignore_disable
        self._host = host
        self._requested_port = _check_int(port, 0, 65535, "port")
        self.comm_key = _check_int(
            state.comm_key if comm_key is None else comm_key, 0, 0xFFFFFFFF, "comm_key"
        )
        self.chunked = chunked
        if drop_after_bytes is not None:
            _check_int(drop_after_bytes, 0, 2**62, "drop_after_bytes")
        self.drop_after_bytes = drop_after_bytes
        if stall_after_bytes is not None:
            _check_int(stall_after_bytes, 0, 2**62, "stall_after_bytes")
        self.stall_after_bytes = stall_after_bytes
        if delay_ms < 0:
            raise ValueError("delay_ms: must not be negative")
        self.delay_ms = delay_ms
        self.silent = silent
        if live_interval is not None and live_interval <= 0:
            raise ValueError("live_interval: must be a positive number of seconds")
        self.live_interval = live_interval
        self.clock_offset = float(clock_offset)
        try:
            year = self.device_now().year
        except OverflowError:
            year = 0
        if not 2000 <= year <= 2099:
            raise ValueError("clock_offset: the device clock must stay within 2000-2099")
        self.enabled = True
        # CONNECTs received: the sessions clients opened, over TCP or UDP.
        self.connects = 0
        # "disable", "enable", "restart" as clients send them, oldest first.
        self.enable_log: list[str] = []
        # punch_during_read: punches made (in the log) and refused while disabled.
        self.punches_during_read = 0
        self._waiting: list[str] = []
        self._next_reader_punch = 0
        self._last_reader_punch: datetime | None = None
        self._door_unlocked_until = 0.0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._started = False
        self._tcp_sock: socket.socket | None = None
        self._udp_sock: socket.socket | None = None
        self._port = 0
        self._threads: list[threading.Thread] = []
        self._sessions: set[_Session] = set()
        self._tcp_clients: dict[threading.Thread, socket.socket] = {}
        self._udp_peers: dict[tuple, queue.Queue] = {}
        self._next_session = random.randrange(1, 0xFFFF)

    # -- lifecycle -------------------------------------------------------------------

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        return self._port

    def start(self) -> "ZKEmulator":
        """Binds TCP and UDP on one port (port 0: a free one) and starts serving.

        Raises OSError when the port cannot be bound.
        """
        if self._started:
            raise RuntimeError("the emulator is already running")
        self._tcp_sock, self._udp_sock, self._port = self._bind()
        self._started = True
        self._spawn(self._accept_loop, "zk-emu-accept")
        self._spawn(self._udp_loop, "zk-emu-udp")
        if self.live_interval:
            self._spawn(self._live_loop, "zk-emu-live")
        logger.info(
            "listening on %s:%d (tcp+udp): %d users, %d records, %d templates",
            self._host,
            self._port,
            len(self.state.users),
            len(self.state.attendance),
            len(self.state.templates),
        )
        return self

    def stop(self) -> None:
        """Closes every socket and joins every thread (bounded)."""
        if not self._started or self._stopping.is_set():
            return
        self._stopping.set()
        with self._lock:
            clients = list(self._tcp_clients.values())
        for conn in clients:
            # Wakes a thread blocked in sendall to a client that stopped reading.
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                logger.debug("a client connection was already closed")
        deadline = time.monotonic() + JOIN_TIMEOUT
        while time.monotonic() < deadline:
            # Again until none is left: a loop may have started a client thread
            # in the poll interval before it saw the stop.
            with self._lock:
                threads = [t for t in self._threads + list(self._tcp_clients) if t.is_alive()]
            if not threads:
                break
            for thread in threads:
                thread.join(max(0.0, deadline - time.monotonic()))
        # Closed only now: a socket closed under a thread still polling it could
        # have its descriptor number reused by another socket meanwhile.
        self._tcp_sock.close()
        self._udp_sock.close()
        logger.info("stopped")

    def serve_forever(self) -> None:
        """Serves until stop() is called or the process is interrupted (Ctrl-C)."""
        if not self._started:
            self.start()
        try:
            while not self._stopping.wait(0.5):
                pass
        finally:
            self.stop()

    def __enter__(self) -> "ZKEmulator":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _bind(self) -> tuple[socket.socket, socket.socket, int]:
        attempts = 20 if self._requested_port == 0 else 1
        attempt = 0
        while True:
            attempt += 1
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                tcp.bind((self._host, self._requested_port))
                port = tcp.getsockname()[1]
                udp.bind((self._host, port))
            except OSError:
                tcp.close()
                udp.close()
                # Port 0 gave a TCP port whose UDP twin is taken: try another.
                if attempt >= attempts:
                    raise
                continue
            tcp.listen(16)
            tcp.settimeout(POLL_INTERVAL)
            udp.settimeout(POLL_INTERVAL)
            return tcp, udp, port

    def _spawn(self, target, name: str, *args) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        with self._lock:
            # Started under the lock so stop() never sees a thread not yet alive.
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
            thread.start()

    # -- device-wide behaviour -------------------------------------------------------

    def device_now(self) -> datetime:
        """The device clock: naive local wall-clock time plus the offset."""
        return (datetime.now() + timedelta(seconds=self.clock_offset)).replace(microsecond=0)

    def set_device_time(self, when: datetime) -> None:
        self.clock_offset = (when - datetime.now()).total_seconds()

    def unlock_door(self, seconds: float) -> None:
        self._door_unlocked_until = time.monotonic() + seconds

    def door_unlocked(self) -> bool:
        return time.monotonic() < self._door_unlocked_until

    def push_punch(
        self,
        user_id: str,
        timestamp: datetime | None = None,
        *,
        status: int = 1,
        punch: int = 0,
    ) -> AttendanceRecord:
        """Someone punches now: the log gets the record and every client that
        registered for attendance events is sent one live event."""
        record = self.state.add_punch(
            user_id=user_id, timestamp=timestamp or self.device_now(), status=status, punch=punch
        )
        with self._lock:
            sessions = list(self._sessions)
        for session in sessions:
            session.queue_event(record)
        return record

    def record_size(self, tcp: bool) -> int:
        """The attendance record size served over TCP (`tcp`) or UDP."""
        return self._record_size or (40 if tcp else 16)

    def waiting_punches(self) -> int:
        """punch_during_read punches refused while disabled, made at the next enable."""
        with self._lock:
            return len(self._waiting)

    def _set_enabled(self, enabled: bool, command: str) -> None:
        with self._lock:
            self.enabled = enabled
            self.enable_log.append(command)
            waiting, self._waiting = (self._waiting, []) if enabled else ([], self._waiting)
        for user_id in waiting:
            # They punched while the clock was locked and punch again now.
            self._reader_punch(user_id)

    def _someone_punches(self) -> None:
        if not self.punch_during_read:
            return
        with self.state.lock:
            users = list(self.state.users)
        if not users:
            return
        with self._lock:
            user = users[self._next_reader_punch % len(users)]
            self._next_reader_punch += 1
            if not (self.enabled or self.ignore_disable):
                self._waiting.append(user.user_id)
                return
        self._reader_punch(user.user_id)

    def _reader_punch(self, user_id: str) -> None:
        # A second apart at least, so no two of them are the same punch.
        moment = self.device_now()
        with self._lock:
            if self._last_reader_punch is not None and moment <= self._last_reader_punch:
                moment = self._last_reader_punch + timedelta(seconds=1)
            self._last_reader_punch = moment
            self.punches_during_read += 1
        self.push_punch(user_id, moment)

    def event_listeners(self) -> int:
        """How many clients are registered for attendance events right now."""
        with self._lock:
            return sum(1 for s in self._sessions if s.event_flags & EF_ATTLOG)

    def _new_session_id(self) -> int:
        with self._lock:
            self.connects += 1
            self._next_session = self._next_session % 0xFFFF + 1
            return self._next_session

    def _wait_before_reply(self) -> None:
        if self.delay_ms:
            self._stopping.wait(self.delay_ms / 1000)

    def _pause(self, seconds: float) -> None:
        self._stopping.wait(seconds)

    # -- TCP -------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, peer = self._tcp_sock.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                # Out of descriptors, a connection aborted before accept: keep listening.
                logger.warning("accept failed: %s", exc)
                self._stopping.wait(POLL_INTERVAL)
                continue
            with self._lock:
                full = len(self._tcp_clients) >= MAX_TCP_CLIENTS
            if full:
                logger.warning("refused %s:%d: %d clients connected", *peer, MAX_TCP_CLIENTS)
                conn.close()
                continue
            thread = threading.Thread(
                target=self._serve_tcp, args=(conn, peer), name=f"zk-emu-tcp-{peer[1]}", daemon=True
            )
            with self._lock:
                self._tcp_clients[thread] = conn
                thread.start()

    def _serve_tcp(self, conn: socket.socket, peer: tuple) -> None:
        sent = 0

        def send(packet: bytes) -> None:
            nonlocal sent
            frame = TCP_MAGIC + struct.pack("<I", len(packet)) + packet
            limit = self.drop_after_bytes
            if limit is not None and sent + len(frame) > limit:
                conn.sendall(frame[: max(0, limit - sent)])
                sent = max(sent, limit)
                raise _ClientGone
            stall = self.stall_after_bytes
            if stall is not None and sent + len(frame) > stall:
                conn.sendall(frame[: max(0, stall - sent)])
                sent = max(sent, stall)
                raise _Stalled
            conn.sendall(frame)
            sent += len(frame)

        label = f"tcp {peer[0]}:{peer[1]}"
        session = None
        abort = False
        selector = selectors.DefaultSelector()
        try:
            # One frame per sendall with Nagle off: pyzk parses each reply from a
            # single recv(), so a frame split across segments breaks it (§1.6).
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(SEND_TIMEOUT)
            session = _Session(self, peer, tcp=True, send=send, local_ip=conn.getsockname()[0])
            with self._lock:
                self._sessions.add(session)
            frames = _TcpFrames(label)
            selector.register(conn, selectors.EVENT_READ)
            while not self._stopping.is_set() and not session.closing:
                if not selector.select(POLL_INTERVAL):
                    session.flush_event()
                    continue
                data = conn.recv(65536)
                if not data:
                    break
                if self.silent:
                    continue
                for packet in frames.feed(data):
                    session.handle(packet)
                    if session.closing:
                        break
        except _ClientGone:
            logger.info("%s: dropped after %d bytes (drop_after_bytes)", label, sent)
            abort = True
        except _Stalled:
            logger.info("%s: hung after %d bytes (stall_after_bytes)", label, sent)
            # Hold the connection open, answering nothing, until the client
            # gives up and closes it or the emulator stops.
            try:
                while not self._stopping.is_set():
                    if selector.select(POLL_INTERVAL) and not conn.recv(65536):
                        break
            except OSError as exc:
                logger.debug("%s: connection ended: %s", label, exc)
        except OSError as exc:
            logger.debug("%s: connection ended: %s", label, exc)
        finally:
            with self._lock:
                self._sessions.discard(session)
                self._tcp_clients.pop(threading.current_thread(), None)
            selector.close()
            if abort:
                # A reset, not a FIN: after an orderly close pyzk's raw receive
                # loop gets b"" forever and spins instead of failing.
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

    # -- UDP -------------------------------------------------------------------------

    def _udp_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                data, peer = self._udp_sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                if self._stopping.is_set():
                    break
                continue
            if self.silent:
                continue
            with self._lock:
                inbox = self._udp_peers.get(peer)
                if inbox is None:
                    if len(self._udp_peers) >= MAX_UDP_PEERS:
                        logger.warning("ignored %s:%d: %d UDP peers active", *peer, MAX_UDP_PEERS)
                        continue
                    inbox = self._udp_peers[peer] = queue.Queue(UDP_QUEUE_DEPTH)
                    start_worker = True
                else:
                    start_worker = False
                try:
                    inbox.put_nowait(data)
                except queue.Full:
                    logger.debug("udp %s:%d: dropped a datagram, peer flooding", *peer)
            if start_worker:
                self._spawn(self._serve_udp_peer, f"zk-emu-udp-{peer[1]}", peer, inbox)

    def _serve_udp_peer(self, peer: tuple, inbox: queue.Queue) -> None:
        sock = self._udp_sock
        local_ip = sock.getsockname()[0]

        def send(packet: bytes) -> None:
            sock.sendto(packet, peer)

        def new_session() -> _Session:
            session = _Session(self, peer, tcp=False, send=send, local_ip=local_ip)
            with self._lock:
                self._sessions.add(session)
            return session

        session = new_session()
        idle_since = time.monotonic()
        try:
            while not self._stopping.is_set():
                try:
                    packet = inbox.get(timeout=POLL_INTERVAL)
                except queue.Empty:
                    session.flush_event()
                    if time.monotonic() - idle_since > UDP_PEER_IDLE:
                        with self._lock:
                            # Leave only with an empty inbox, under the lock the
                            # reader uses, so no datagram is lost in between.
                            if inbox.empty():
                                return
                    continue
                idle_since = time.monotonic()
                session.handle(packet)
                if session.closing:
                    # UDP has no connection to close: EXIT or RESTART ends the
                    # session, and the peer must CONNECT again.
                    with self._lock:
                        self._sessions.discard(session)
                    session = new_session()
        except OSError as exc:
            logger.debug("%s: session ended: %s", session.label, exc)
        finally:
            with self._lock:
                self._sessions.discard(session)
                if self._udp_peers.get(peer) is inbox:
                    del self._udp_peers[peer]

    # -- live punches ----------------------------------------------------------------

    def _live_loop(self) -> None:
        rng = random.Random()
        while not self._stopping.wait(self.live_interval):
            # People punch whether or not anyone listens; a disabled clock
            # refuses them, as a real one does.
            if not self.enabled:
                continue
            with self.state.lock:
                users = list(self.state.users)
            if users:
                user = rng.choice(users)
                status, punch = self._next_punch_of(user.user_id)
                self.push_punch(user.user_id, status=status, punch=punch)

    def _next_punch_of(self, user_id: str) -> tuple[int, int]:
        return next_punch_of(self.state, user_id, self.device_now().date())
