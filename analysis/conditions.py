"""The conditions of each run, one compact row each: device, the card (its GPU UUID), clocks,
power limit, driver and versions, commit, and the command as a person would type it, with no
path of the machine that ran it (paths are shown relative to the run's output, or by their name).

Cards: runs of one GPU model may come from different cards, whose speeds differ. A card is
named by the first 8 hex digits of its UUID (`short_card`); `run_cards` maps each run to its
card, `with_cards` puts each record's card beside it, and `named_run` (`card_namer` in a text)
names a run with its card.
"""
from __future__ import annotations

import posixpath
import re

from attnlab import text as fmt

COLUMNS = ("run", "device", "card (GPU UUID)", "clocks", "power limit", "driver", "CUDA", "torch", "Triton",
           "commit", "started", "command")
# argv[0] of a module run as `python -m NAME` is NAME/__main__.py: show NAME.
MODULE_MAIN = "__main__.py"
OUTPUT_FLAGS = ("--out", "--benchmark-json", "--json")
SHORT_CARD = 8        # hex digits of a GPU UUID that name its card
UUID_PREFIX = re.compile(r"^(GPU|MIG)-")


def short_card(uuid) -> str | None:
    """'GPU-d3d8bafb-f135-...' -> 'd3d8bafb'; None where no UUID was recorded."""
    if not isinstance(uuid, str) or not uuid.strip():
        return None
    return UUID_PREFIX.sub("", uuid.strip())[:SHORT_CARD]


def run_cards(envs) -> dict:
    """{run_id: short card} for every run whose environment recorded a GPU UUID."""
    if envs is None or not len(envs) or "gpu_uuid" not in envs:
        return {}
    cards = {run: short_card(uuid) for run, uuid in zip(envs["run_id"], envs["gpu_uuid"])}
    return {run: card for run, card in cards.items() if card and not fmt.missing(run)}


def with_cards(results, envs):
    """`results` with `gpu_uuid` filled from each record's run's environment where the record
    has none: what tells apart two cards of one GPU model."""
    uuids = {} if envs is None or "gpu_uuid" not in envs else {
        run: uuid for run, uuid in zip(envs["run_id"], envs["gpu_uuid"]) if short_card(uuid)}
    found = results["run_id"].map(uuids)
    return results.assign(gpu_uuid=results["gpu_uuid"].fillna(found) if "gpu_uuid" in results else found)


def record_cards(rows) -> dict:
    """{run_id: short card} of the records in `rows` (a frame with `gpu_uuid`, see `with_cards`)."""
    if "gpu_uuid" not in rows:
        return {}
    cards = ((run, short_card(uuid)) for run, uuid in zip(rows["run_id"], rows["gpu_uuid"]))
    return {run: card for run, card in cards if card}


def cards_of(rows) -> list:
    """The cards (short) the records in `rows` were measured on, sorted; [] where unknown."""
    return sorted(set(record_cards(rows).values()))


def named_run(run_id, cards: dict) -> str:
    """'RUN (card d3d8bafb)', or the run alone where its card is unknown."""
    card = cards.get(run_id)
    return f"{run_id} (card {card})" if card else str(run_id)


def card_namer(cards: dict):
    """A function that follows each whole run id in a text with its card (`named_run`), where
    the card is known and not yet said; for text written without knowing the cards."""
    if not cards:
        return str
    runs = "|".join(map(re.escape, sorted(cards, key=len, reverse=True)))     # the longest first
    named = re.compile(rf"(?<![\w-])({runs})(?![\w-])(?! \(card )")
    return lambda text: named.sub(lambda m: named_run(m[1], cards), str(text))


def several_cards_note(cards: list) -> str:
    """A warning where records set side by side come from more than one card, else ''."""
    if len(cards) < 2:
        return ""
    return (f"these runs come from {len(cards)} different cards ({', '.join(cards)}): the same GPU model, not the "
            f"same card")


def conditions_blocks(results, envs) -> list:
    """A table of one row per run, and a line for runs with no environment record."""
    rows = [run_row(env) for env in envs.to_dict("records")]
    blocks = [("table", list(COLUMNS), rows)] if rows else []
    missing = sorted(set(results["run_id"]) - set(envs["run_id"].dropna()))
    if missing:
        blocks.append(("p", f"No environment record for run(s) {', '.join(missing)}: their conditions are unknown."))
    return blocks


def run_row(env: dict) -> list:
    versions = {k: _text(env.get(k)) for k in ("driver", "cuda", "torch", "triton")}
    return [_text(env.get("run_id")), _text(env.get("gpu_name") or env.get("cpu") or env.get("device")),
            _text(env.get("gpu_uuid")), clocks_text(env.get("clocks")), _watts(env.get("power_limit_w")),
            versions["driver"], versions["cuda"], versions["torch"], versions["triton"],
            commit_text(env.get("git_commit")), _text(env.get("time")), command_text(env.get("argv"))]


def clocks_text(clocks) -> str:
    """'SM 1980 of 1980 MHz, memory 2619 MHz': the application (target) clocks against their
    maximum; the SM clock read while idle says nothing of the run."""
    if not isinstance(clocks, dict):
        return "-"
    sm = clocks.get("sm_app_mhz") or clocks.get("sm_mhz")
    top, memory = clocks.get("sm_max_mhz"), clocks.get("mem_app_mhz") or clocks.get("mem_mhz")
    parts = [f"SM {sm}" + (f" of {top}" if top else "") + " MHz"] if sm else []
    parts += [f"memory {memory} MHz"] if memory else []
    return ", ".join(parts) or "-"


def commit_text(commit) -> str:
    """A short commit, or 'unknown' where git could not say (never 'HEAD')."""
    text = str(commit) if isinstance(commit, str) else ""
    is_hash = len(text) >= 7 and all(c in "0123456789abcdef" for c in text.lower())
    return text[:10] if is_hash else "unknown"


def command_text(argv) -> str:
    """The command as typed: the program's name, then its arguments, machine paths shown
    relative to where the run wrote its output (or by their file name)."""
    if not isinstance(argv, list) or not argv:
        return "-"
    argv = [str(a) for a in argv]
    base = _output_folder(argv)
    return " ".join([_program(argv[0])] + [_argument(a, base) for a in argv[1:]])


def _program(first: str) -> str:
    if first == "-c":
        return "python3 -c"
    name = posixpath.basename(first)
    return posixpath.basename(posixpath.dirname(first)) if name == MODULE_MAIN else name


def _output_folder(argv: list) -> str | None:
    for i, arg in enumerate(argv):
        for flag in OUTPUT_FLAGS:
            if arg == flag and i + 1 < len(argv):
                return posixpath.dirname(argv[i + 1])
            if arg.startswith(flag + "="):
                return posixpath.dirname(arg.split("=", 1)[1])
    return None


def _argument(arg: str, base: str | None) -> str:
    flag, eq, value = arg.partition("=") if arg.startswith("--") and "=" in arg else ("", "", arg)
    if not posixpath.isabs(value):
        return arg
    inside = base and (value == base or value.startswith(base.rstrip("/") + "/"))
    shown = posixpath.relpath(value, base) if inside else posixpath.basename(value)
    return f"{flag}{eq}{shown}"


def _watts(value) -> str:
    return "-" if fmt.missing(value) else f"{float(value):.0f} W"


def _text(value) -> str:
    return "-" if fmt.missing(value) or value == "" else str(value)
