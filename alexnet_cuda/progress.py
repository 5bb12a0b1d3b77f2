"""Progress bars for the command-line tools: tqdm where it is importable and the stream is a terminal,
otherwise a small built-in bar (one rewritten line on a terminal, a plain line every few seconds in a log
file or pipe), so no tool depends on tqdm or on stdout being a TTY."""
import sys
import time


def _fmt_time(seconds):
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def _is_tty(stream):
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class _BuiltinBar:
    """total steps, an optional starting count; update(n) and set_postfix(str) like tqdm."""

    def __init__(self, total, desc="", unit="it", initial=0, stream=None, interval=None, disable=False):
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self._start = initial
        self.stream = stream or sys.stderr
        self.tty = _is_tty(self.stream)
        self.interval = interval if interval is not None else (0.2 if self.tty else 10.0)
        self.disable = disable
        self.postfix = ""
        self._t0 = time.monotonic()
        self._last = 0.0 if self.tty else self._t0  # a log file gets no line for the first step
        self._width = 0
        self._closed = False

    def _line(self):
        elapsed = time.monotonic() - self._t0
        done = self.n - self._start
        rate = done / elapsed if elapsed > 0 and done > 0 else None
        parts = [self.desc] if self.desc else []
        if self.total:
            frac = min(1.0, self.n / self.total)
            filled = int(20 * frac)
            parts.append(f"{100 * frac:3.0f}% [{'#' * filled}{'.' * (20 - filled)}] {self.n}/{self.total}")
            eta = (self.total - self.n) / rate if rate else None
            parts.append(f"{_fmt_time(elapsed)}<{_fmt_time(eta)}")
        else:
            parts.append(f"{self.n} {self.unit} {_fmt_time(elapsed)}")
        if rate:
            parts.append(f"{rate:.1f} {self.unit}/s")
        if self.postfix:
            parts.append(self.postfix)
        return " ".join(parts)

    def _emit(self, final=False):
        line = self._line()
        try:
            if self.tty:
                pad = max(0, self._width - len(line))
                self.stream.write("\r" + line + " " * pad + ("\n" if final else ""))
                self._width = len(line)
            else:
                self.stream.write(line + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # a closed or broken stream never stops the work
            self.disable = True

    def update(self, n=1):
        self.n += n
        if self.disable:
            return
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._emit()

    def set_postfix_str(self, text, refresh=True):
        self.postfix = text

    def write(self, text):
        if self.tty and self._width and not self.disable:
            self.stream.write("\r" + " " * self._width + "\r")
            self._width = 0
        print(text, file=self.stream, flush=True)

    def close(self):
        if self._closed:
            return
        self._closed = True
        if not self.disable:
            self._emit(final=True)


class _TqdmBar:
    def __init__(self, tqdm_cls, total, desc, unit, initial, stream, disable):
        self._bar = tqdm_cls(total=total, desc=desc, unit=unit, initial=initial, file=stream, disable=disable,
                             dynamic_ncols=True, leave=True)
        self._tqdm = tqdm_cls

    def update(self, n=1):
        self._bar.update(n)

    def set_postfix_str(self, text, refresh=True):
        self._bar.set_postfix_str(text, refresh=refresh)

    def write(self, text):
        self._tqdm.write(text, file=self._bar.fp)

    def close(self):
        self._bar.close()


def progress_bar(total, desc="", unit="it", initial=0, stream=None, disable=False):
    """A bar with update(n), set_postfix_str(text), write(text) (prints above the bar) and close()."""
    stream = stream or sys.stderr
    if _is_tty(stream) and not disable:
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        if tqdm is not None:
            return _TqdmBar(tqdm, total, desc, unit, initial, stream, disable)
    return _BuiltinBar(total, desc=desc, unit=unit, initial=initial, stream=stream, disable=disable)
