"""Prompts and infilling templates: which positions of a row are fixed, and to what.

The one rule every sampler follows: **a position is fixed iff the start state holds a token there**
(not the mask id). The MDLM/EDLM loop never changes an unmasked token (SUBS carry-over, the copy rule
of Eq. 5, proposals carry x_t's tokens, the posterior step keeps them), the AR sampler only draws
masked positions, and the long-text driver fixes the committed prefix of each window the same way.
So prompts, infilling, semi-autoregressive windows and (later) block-wise sampling all reduce to
"put the known tokens into ``x_init``".

Forms a user can give (CLI ``--prompt``/``--prompt-ids``/``--prompts-file``, or :func:`parse_prompt`):

* text: ``"w3 w30"`` (a prompt: continue it) or a template ``"The [MASK:12] of the [MASK:5]"``
  (``[MASK]`` = one token); the literal pieces are encoded with the data's tokenizer;
* token ids: ``"5 12 _ _ 7"`` or ``"5 [MASK:2] 7"`` (``_`` = one generated token), or a JSON list with
  ``null`` for generated positions.

Every row of the data starts with BOS (all framings, ``data/wrap.py``), so BOS is put in front unless
the template already starts with it. Positions after the template are generated too (a continuation).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from edlm_dist.errors import ConfigError

MASK_SPAN = re.compile(r"\[MASK(?::(\d+))?\]")


@dataclass(frozen=True)
class Prompt:
    """A row template from position 0: a token id where fixed, None where generated."""

    tokens: tuple[Optional[int], ...]
    source: str  # what the user wrote

    @property
    def kind(self) -> str:
        """'infill' when a fixed token follows a generated one, else 'prompt' (a prefix to continue)."""
        seen_gap = False
        for token in self.tokens:
            seen_gap |= token is None
            if seen_gap and token is not None:
                return "infill"
        return "prompt"


def _mask_count(match: re.Match) -> int:
    count = int(match.group(1) or 1)
    if count < 1:
        raise ConfigError(f"'{match.group(0)}' asks for {count} tokens; write [MASK:n] with n >= 1")
    return count


def _text_template(text: str, tokenizer) -> list[Optional[int]]:
    out: list[Optional[int]] = []
    pieces = MASK_SPAN.split(text)  # literal, count, literal, count, ...
    spaces_are_tokens = getattr(tokenizer, "name", "") in ("text8", "char")  # a space is a character there
    for index in range(0, len(pieces), 2):
        literal, before_mask = pieces[index], index + 1 < len(pieces)
        if before_mask and not spaces_are_tokens:
            literal = literal.rstrip()  # BPE words carry their leading space: the generated span starts with it
        if literal.strip() or spaces_are_tokens:
            out.extend(tokenizer.encode(literal))
        if before_mask:
            out.extend([None] * int(pieces[index + 1] or 1))
    return out


def _id_template(spec: str | Sequence, vocab_size: int) -> list[Optional[int]]:
    if isinstance(spec, str):
        items: list = []
        for word in spec.replace(",", " ").split():
            match = MASK_SPAN.fullmatch(word)
            if match:
                items.extend([None] * _mask_count(match))
            elif word == "_":
                items.append(None)
            else:
                try:
                    items.append(int(word))
                except ValueError:
                    raise ConfigError(f"token-id template item {word!r} is not an id, '_' or [MASK:n]; "
                                      "write e.g. \"5 12 _ _ 7\"") from None
    else:
        items = list(spec)
    for item in items:
        if item is not None and (not isinstance(item, int) or isinstance(item, bool) or not 0 <= item < vocab_size):
            raise ConfigError(f"token id {item!r} is outside the vocabulary [0, {vocab_size}); use ids of the data's "
                              "tokenizer and null/_ for generated positions")
    return items


def parse_prompt(spec, tokenizer, *, ids: bool = False) -> Prompt:
    """A :class:`Prompt` from text (``ids=False``) or a token-id template (``ids=True`` or a list)."""
    if ids or not isinstance(spec, str):
        tokens = _id_template(spec, tokenizer.vocab_size)
    else:
        for match in MASK_SPAN.finditer(spec):
            _mask_count(match)
        tokens = _text_template(spec, tokenizer)
    if any(token == tokenizer.mask_id for token in tokens):
        raise ConfigError("a template holds the mask token as a fixed token; write [MASK:n] or _ for positions "
                          "to generate")
    if not tokens or tokens[0] != tokenizer.bos_id:
        tokens = [tokenizer.bos_id, *tokens]
    source = spec if isinstance(spec, str) else json.dumps(list(spec))
    return Prompt(tuple(tokens), source)


def read_prompts_file(path: str | Path, tokenizer) -> list[Prompt]:
    """Prompts from a JSONL file (objects with ``prompt``, ``infill`` or ``ids``) or one text per line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"prompts file {path} does not exist; pass a JSONL file or a text file with one prompt "
                          "per line")
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path} line {number} is not valid JSON ({exc.msg}); write one object per "
                                  "line like {\"prompt\": \"...\"}") from None
            keys = [key for key in ("prompt", "infill", "ids") if key in record]
            if len(keys) != 1:
                raise ConfigError(f"{path} line {number} needs exactly one of 'prompt', 'infill', 'ids'")
            prompts.append(parse_prompt(record[keys[0]], tokenizer, ids=keys[0] == "ids"))
        else:
            prompts.append(parse_prompt(line, tokenizer))
    if not prompts:
        raise ConfigError(f"prompts file {path} holds no prompt; write one per line")
    return prompts


IDS_PREFIX = "ids:"  # a config entry "ids:5 12 _ 7" is a token-id template (CLI --prompt-ids)


def load_prompts(texts: Sequence[str], prompts_file: str, tokenizer) -> list[Prompt]:
    """The prompts of a run: ``sample.prompts`` (text templates, or ``ids:`` token-id templates), then the file."""
    prompts = [parse_prompt(text[len(IDS_PREFIX):], tokenizer, ids=True) if text.startswith(IDS_PREFIX)
               else parse_prompt(text, tokenizer) for text in texts]
    if prompts_file:
        prompts += read_prompts_file(prompts_file, tokenizer)
    return prompts


def start_states(sample_ids: Sequence[int], prompts: Sequence[Prompt], per_prompt: int, length: int,
                 mask_id: int) -> torch.Tensor:
    """(B, length) start states of samples ``sample_ids``: each one's prompt (all masks without prompts)."""
    if not prompts:
        return torch.full((len(sample_ids), length), mask_id, dtype=torch.long)
    rows = start_rows(prompts, length, mask_id)
    return rows[[prompt_of_sample(i, prompts, per_prompt) for i in sample_ids]]


def start_rows(prompts: Sequence[Prompt], length: int, mask_id: int) -> torch.Tensor:
    """(P, length) start states: each template's fixed tokens, ``mask_id`` everywhere else."""
    rows = torch.full((len(prompts), length), mask_id, dtype=torch.long)
    for row, prompt in zip(rows, prompts):
        if len(prompt.tokens) > length:
            raise ConfigError(f"the template {prompt.source!r} has {len(prompt.tokens)} tokens (BOS included) but "
                              f"rows have {length}; shorten it or generate longer rows (sample.length)")
        for position, token in enumerate(prompt.tokens):
            if token is not None:
                row[position] = token
    return rows


def spans(fixed: Sequence[bool]) -> list[list]:
    """Runs of fixed / generated positions: ``[[start, end, "fixed"|"generated"], ...]`` (end exclusive)."""
    out: list[list] = []
    for position, is_fixed in enumerate(fixed):
        kind = "fixed" if is_fixed else "generated"
        if out and out[-1][2] == kind:
            out[-1][1] = position + 1
        else:
            out.append([position, position + 1, kind])
    return out


def marked_text(tokens: Sequence[int], fixed: Sequence[bool], tokenizer) -> str:
    """The decoded row with every generated span wrapped in ``[[ ]]`` (fixed text as written)."""
    parts = []
    for start, end, kind in spans(fixed):
        text = tokenizer.decode(list(tokens[start:end]))
        parts.append(f"[[{text}]]" if kind == "generated" else text)
    return (" " if getattr(tokenizer, "name", "") == "synthetic" else "").join(parts)  # synthetic: words


def prompt_of_sample(index: int, prompts: Sequence[Prompt], per_prompt: int) -> Optional[int]:
    """Which prompt sample ``index`` continues: samples p·n .. p·n + n − 1 belong to prompt p (None: no prompts)."""
    return index // per_prompt if prompts else None


def annotate(record: dict, start: Sequence[int], mask_id: int, tokenizer, prompts: Sequence[Prompt],
             per_prompt: int) -> dict:
    """Add the readable fields of one sample: its prompt, the fixed/generated spans, the marked text."""
    fixed = [token != mask_id for token in start]
    prompt_index = prompt_of_sample(record["index"], prompts, per_prompt)
    record["prompt_index"] = prompt_index
    record["prompt"] = prompts[prompt_index].source if prompt_index is not None else None
    record["spans"] = spans(fixed)
    record["marked_text"] = marked_text(record["tokens"], fixed, tokenizer) if tokenizer is not None else None
    return record


def format_samples(records: Sequence[dict], count: int) -> str:
    """The first ``count`` samples for a terminal: index, prompt, and the text with generated spans in [[ ]]."""
    lines = []
    for record in list(records)[:count]:
        head = f"--- sample {record['index']}"
        if record.get("prompt") is not None:
            head += f" (prompt {record['prompt_index']}: {record['prompt']!r})"
        lines.append(head)
        lines.append(record.get("marked_text") or record.get("text") or " ".join(map(str, record["tokens"])))
    return "\n".join(lines)
