"""absl flags generated from `TrainConfig`: the same names, defaults, help and choices."""

import dataclasses
import fractions

from absl import flags

from arat_tf.config import TrainConfig, config_fields


class NumberOrFractionParser(flags.FloatParser):
    """A float flag that also accepts fractions, so budgets read as in papers: `--eps=8/255`."""

    def convert(self, argument):
        if isinstance(argument, str) and "/" in argument:
            try:
                return float(fractions.Fraction(argument.strip()))
            except (ValueError, ZeroDivisionError) as error:
                raise ValueError(f"{argument!r} is not a number or fraction: {error}") from None
        return super().convert(argument)


def define_train_flags(flag_values=flags.FLAGS):
    """Defines one flag per `TrainConfig` field on `flag_values` (absl's global FLAGS by default)."""
    for field in config_fields():
        help_text = field.metadata["help"]
        choices = field.metadata.get("choices")
        if field.type in ("bool", bool):
            flags.DEFINE_bool(field.name, field.default, help_text, flag_values=flag_values)
        elif choices is not None:
            flags.DEFINE_enum(field.name, field.default, choices, help_text, flag_values=flag_values)
        elif field.type in ("int", int):
            flags.DEFINE_integer(field.name, field.default, help_text, flag_values=flag_values)
        elif field.type in ("float", float):
            flags.DEFINE(NumberOrFractionParser(), field.name, field.default, help_text,
                         flag_values, flags.ArgumentSerializer())
        else:
            flags.DEFINE_string(field.name, field.default, help_text, flag_values=flag_values)


def config_from_flags(flag_values=flags.FLAGS, **overrides):
    """Builds a validated `TrainConfig` from parsed flags (raises ValueError on bad values)."""
    values = {field.name: flag_values[field.name].value for field in config_fields()}
    values.update(overrides)
    return TrainConfig(**values)


def config_to_flagfile(config):
    """The config as a flagfile `python -m arat_tf.train --flagfile=...` replays exactly."""
    lines = []
    for field in config_fields():
        value = getattr(config, field.name)
        if isinstance(value, bool):
            lines.append(f"--{field.name}" if value else f"--no{field.name}")
        elif isinstance(value, float):
            lines.append(f"--{field.name}={value!r}")
        else:
            lines.append(f"--{field.name}={value}")
    return "\n".join(lines) + "\n"


def config_as_dict(config):
    """Plain dict of the config (for JSON files and model cards)."""
    return dataclasses.asdict(config)
