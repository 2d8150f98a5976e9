"""JSON-lines outputs written batch by batch that survive ctrl+c, kill -9 and power cuts: generate_rejected.py's
preference pairs and distill_data.py's teacher answers.

Each row carries `id`, its index in the input. A batch is appended with one write + fsync, then
`OUTPUT.progress.json` records how far the input is done (`next_index`), the counters and the resolved
configuration. The same command again drops a torn last line or the lines of a batch whose progress was never
recorded, checks the last kept line against the input, and continues from the first unfinished batch; an output
another run (other settings) began is refused.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from tqdm.auto import tqdm

from utils.config import ONE_COMMAND_ACTIONS
from utils.data.sources import PROGRESS_SUFFIX
from utils.errors import UserError
from utils.io import check_output_file, write_json_atomic

logger = logging.getLogger(__name__)


def progress_path(output: Path) -> Path:
    return output.with_name(output.name + PROGRESS_SUFFIX)  # a record that data readers skip


def run_settings(values: dict) -> dict:
    """What makes an output this run's: its recorded configuration (`utils.config.run_config`) but --max_rows (a
    larger one goes on with the same run). Progress records written before actions were left out may hold
    them: they are dropped here too."""
    return {key: value for key, value in values.items() if key not in (*ONE_COMMAND_ACTIONS, "max_rows")}


def resume_point(output: Path, items: list[dict], settings: dict,
                 prompt_of: Callable[[dict], Any] = lambda row: row.get("prompt")) -> tuple[int, int, dict]:
    """(input rows done, rows kept in the output, the recorded counters). Refuses an output that another run
    (other `settings`, the resolved configuration) began, or whose last kept line's prompt (`prompt_of(row)`) is
    not the prompt of its input row. Cuts the output back to its last recorded batch: a torn last line (killed
    mid-write) or lines of a batch whose progress was never recorded (they are made again)."""
    if not output.exists():
        return 0, 0, {}
    data = output.read_bytes()
    state = json.loads(progress_path(output).read_text()) if progress_path(output).exists() else {}
    recorded = run_settings(state.get("config", settings))
    if changed := [f"{key}: {recorded.get(key, '(unset)')} -> {settings.get(key, '(unset)')}"
                   for key in sorted(set(recorded) | set(settings)) if recorded.get(key) != settings.get(key)]:
        raise UserError("the output was begun by another run; it differs in\n    " + "\n    ".join(changed),
                        path=str(output), field="output",
                        fix="run with the settings above to resume it, choose another --output, or pass --overwrite "
                            "to start over")
    keep, kept, last, last_line = 0, 0, None, 0
    for line_no, line in enumerate(data.split(b"\n")[:-1], start=1):  # what follows the last newline is torn
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise UserError("not a JSON line; the output was not written by this script", path=str(output),
                            line=line_no, fix="pass --overwrite to start over, or choose another --output") from None
        if "next_index" in state and row.get("id", -1) >= state["next_index"]:
            break
        keep, kept, last, last_line = keep + len(line) + 1, kept + 1, row, line_no
    if last is not None:
        index = last.get("id")
        if not isinstance(index, int) or index >= len(items) or items[index]["prompt"] != prompt_of(last):
            raise UserError(f"this line does not match row {index} of the input; the output was made from other "
                            "data", path=str(output), line=last_line,
                            fix="pass the same --input, or --overwrite to start over")
    if keep < len(data):
        logger.warning("dropping %d bytes of unfinished output at the end of %s", len(data) - keep, output)
        with open(output, "r+b") as handle:
            handle.truncate(keep)
    done = state.get("next_index", last["id"] + 1 if last else 0)
    return min(done, len(items)), kept, state


def append_batch(handle: IO[bytes], output: Path, rows: list[dict], record: dict) -> None:
    """Append `rows` as JSON lines in one write, on disk before it counts, then record `record` (`next_index`,
    the counters, `config`) as the output's progress."""
    handle.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8"))
    handle.flush()
    os.fsync(handle.fileno())
    write_json_atomic(progress_path(output), record)


def start_output(output: Path, overwrite: bool) -> None:
    """Refuse an `output` that is not a file path; with `overwrite`, forget what a run wrote there (an existing
    output is otherwise resumed)."""
    check_output_file(output, "output")
    if overwrite:
        output.unlink(missing_ok=True)
        progress_path(output).unlink(missing_ok=True)


def all_done(output: Path, start: int, rows: int) -> bool:
    """Whether the output holds every row already (logged: the same command again has nothing to do)."""
    if start >= rows:
        logger.info("all %d rows are done in %s already: nothing to do", rows, output)
    return start >= rows


def write_batches(output: Path, items: list[dict], start: int, batch_size: int, counts: dict, settings: dict,
                  rows_of: Callable[[int, list[dict]], list[dict]], desc: str) -> bool:
    """Make and append the rows of `items[start:]`, `batch_size` items at a time: `rows_of(begin, batch)` returns a
    batch's rows (`id` = index in `items`) and adds what it skipped to `counts`; `counts["written"]` and the
    progress record follow each batch. False when ctrl+c stopped it (what was recorded stays)."""
    if start:
        logger.info("resuming at row %d of %d (%s)", start, len(items), output)
    output.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(items), initial=start, desc=desc, unit="row")
    try:
        with open(output, "ab") as handle:
            for begin in range(start, len(items), batch_size):
                batch = items[begin:begin + batch_size]
                rows = rows_of(begin, batch)
                counts["written"] += len(rows)
                append_batch(handle, output, rows, {"next_index": begin + len(batch), **counts, "rows": len(items),
                                                    "config": settings})
                bar.update(len(batch))
    except KeyboardInterrupt:
        logger.warning("interrupted after %d of %d rows; run the same command again to continue", bar.n, len(items))
        return False
    finally:
        bar.close()
    return True
