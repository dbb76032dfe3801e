"""The evaluation attacks by name, and the suites (AutoAttack standard, fast) built from them.

Every evaluation attack has one signature, `attack(forward, x, labels, eps, norm, seed) ->
(x_adv, success)`, where `forward` is the model's logits in inference mode, so the evaluator can run
any list of them in order on the examples each previous one left unbroken (AutoAttack's protocol).
The training attacks (`arat_tf.attacks.AttackConfig`) are a separate, weaker, explicit setting.
"""

import dataclasses
import re

import tensorflow as tf

from arat_tf.attacks import apgd, apgd_targeted, fab_targeted, pgd_l2, pgd_linf, square_linf


def _misclassified(forward, x_adv, labels):
    predictions = tf.argmax(forward(x_adv), axis=-1, output_type=tf.int32)
    return predictions != tf.cast(labels, tf.int32)


@dataclasses.dataclass(frozen=True)
class EvaluationAttack:
    """A named attack with its fixed settings.

    Attributes:
        name: as printed in reports ("apgd-ce", "pgd20", ...).
        run: `(forward, x, labels, eps, norm, seed) -> (x_adv, success)`.
        norms: the threat models it implements.
        white_box: False for query-only attacks (Square), used by the sanity check.
    """

    name: str
    run: object
    norms: tuple = ("linf", "l2")
    white_box: bool = True


def pgd_attack(steps, restarts=1, loss="ce"):
    """PGD-`steps` from a uniform random start (step eps/4 as PGD-20 at 8/255 uses 2/255), keeping
    per example the first of `restarts` runs that succeeds."""

    def run(forward, x, labels, eps, norm, seed):
        attack = pgd_linf if norm == "linf" else pgd_l2
        best = x
        success = tf.zeros_like(labels, dtype=tf.bool)
        for restart in range(restarts):
            x_adv = attack(forward, x, labels, eps=eps, step_size=eps / 4, steps=steps, loss=loss,
                           seed=seed * 1009 + restart)
            broken = _misclassified(forward, x_adv, labels)
            new = tf.logical_and(broken, tf.logical_not(success))
            best = tf.where(new[:, None, None, None], x_adv, best)
            success = tf.logical_or(success, broken)
        return best, success

    suffix = "" if loss == "ce" else f"-{loss}"
    restart_text = "" if restarts == 1 else f"x{restarts}"
    return EvaluationAttack(f"pgd{steps}{suffix}{restart_text}", run)


def apgd_ce_attack(steps=100):
    def run(forward, x, labels, eps, norm, seed):
        return apgd(forward, x, labels, eps=eps, norm=norm, loss="ce", steps=steps, seed=seed)

    return EvaluationAttack("apgd-ce", run)


def apgd_t_attack(steps=100, num_target_classes=9):
    def run(forward, x, labels, eps, norm, seed):
        return apgd_targeted(forward, x, labels, eps=eps, norm=norm, steps=steps,
                             num_target_classes=num_target_classes, seed=seed)

    return EvaluationAttack("apgd-t", run)


def fab_t_attack(steps=100, num_target_classes=9):
    def run(forward, x, labels, eps, norm, seed):
        return fab_targeted(forward, x, labels, eps=eps, steps=steps,
                            num_target_classes=num_target_classes, seed=seed)

    return EvaluationAttack("fab-t", run, norms=("linf",))


def square_attack(n_queries=5000):
    def run(forward, x, labels, eps, norm, seed):
        return square_linf(forward, x, labels, eps=eps, n_queries=n_queries, seed=seed)

    return EvaluationAttack("square", run, norms=("linf",), white_box=False)


SUITES = {
    # AutoAttack "standard" (Croce & Hein 2020): the number to publish.
    "autoattack": lambda num_classes: [
        apgd_ce_attack(100), apgd_t_attack(100, 9), fab_t_attack(100, 9), square_attack(5000)
    ],
    # What the ARAT authors' scoring library runs: 10 iterations, every target class. Named
    # "autoattack-fast" in every report; useful to compare with the paper's Table 3, not to publish.
    "autoattack-fast": lambda num_classes: [
        apgd_ce_attack(10), apgd_t_attack(10, num_classes - 1),
        fab_t_attack(10, num_classes - 1), square_attack(5000),
    ],
}
SINGLE_ATTACKS = ("pgd<K>", "pgd<K>x<R>", "cw<K>", "apgd-ce", "apgd-t", "fab-t", "square")
_PGD = re.compile(r"^(pgd|cw)(\d+)(?:x(\d+))?$")


def resolve_attacks(names, num_classes, norm):
    """Expands attack and suite names into `EvaluationAttack`s, in order.

    Args:
        names: e.g. `["pgd20", "cw20", "autoattack"]`; "pgd20x5" is PGD-20 with 5 restarts and
            "cw30" PGD-30 on the CW margin loss.
        num_classes: the dataset's number of classes (targets of the fast suite).
        norm: "linf" or "l2": attacks that do not implement it are rejected.

    Returns:
        A list of `EvaluationAttack`.

    Raises:
        ValueError: an unknown name, or an attack without this norm.
    """
    attacks = []
    for name in names:
        match = _PGD.match(name)
        if name in SUITES:
            suite = [a for a in SUITES[name](num_classes) if norm in a.norms]
            attacks.extend(suite)
        elif match:
            kind, steps, restarts = match.group(1), int(match.group(2)), int(match.group(3) or 1)
            if steps < 1 or restarts < 1:
                raise ValueError(f"attack {name!r}: steps and restarts must be >= 1.")
            attacks.append(pgd_attack(steps, restarts, loss="cw" if kind == "cw" else "ce"))
        elif name in ("apgd-ce", "apgd-t", "fab-t", "square"):
            attack = {"apgd-ce": apgd_ce_attack, "apgd-t": apgd_t_attack, "fab-t": fab_t_attack,
                      "square": square_attack}[name]()
            if norm not in attack.norms:
                raise ValueError(f"attack {name!r} implements only {attack.norms}, not --norm={norm}.")
            attacks.append(attack)
        else:
            raise ValueError(
                f"Unknown attack {name!r}: use a suite ({', '.join(SUITES)}) or one of "
                f"{', '.join(SINGLE_ATTACKS)}."
            )
    if not attacks:
        raise ValueError("No attack to run.")
    return attacks
