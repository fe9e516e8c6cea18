"""sweep: the ablations as one command: steering scale, layer, MLP width, MLP branch and seed (stages.sweep).

The grid is a YAML file (configs/sweeps/smoke.yaml, paper.yaml; or a path) or inline, e.g.
--grid "scale=[0,2,4,8];layer=[12,15];variants=[baseline,caa,mlp_mc,mlp_gen]". Knobs: scale, layer,
mlp_expansion, branch (the MLP arms: mc, gen, joint), seed. The cells are the product of the knobs' values;
each is one evaluate run with a variant run per variant, tagged sweep.<knob>, sweep.name and sweep.reference.
Finished stage runs with the same parameters and code version are reused (the extraction, a bank per layer and
seed, an MLP per layer, width, branch and seed, finished cells), so a killed sweep continues when started again.
`analyze` draws accuracy against scale and layer, the MLP arms and the seed spread from the cells.

Parameters: --model, --data, --split, --grid, --judge, --overrides (after the grid file's), --preset, --dry-run
(the cells, what each would reuse or run, and an estimate of the work).
Logs: a parent run (tag sweep.name) with sweep/cells.json, and the stages' runs nested in it.
"""

from argparse import Namespace

from core.config import Config
from entrypoints import _cli


class SweepEntry(_cli.Entry):
    def config(self, args: Namespace) -> Config:
        """The grid file's overrides, then the command's."""
        grid = _cli.stage("sweep").parse_grid(args.grid)
        extra = [f"judge.model={args.judge}"] if args.judge else []
        return _cli.build_config(args, [*grid.overrides, *extra])


def _grid(args: Namespace):  # type: ignore[no-untyped-def]
    return _cli.stage("sweep").parse_grid(args.grid)


ENTRY = SweepEntry(
    "sweep", __doc__, lambda cfg, args: _cli.stage("sweep_plan").plan(cfg, _grid(args)),
    lambda cfg, args: _cli.stage("sweep").run(cfg, _grid(args)),
    options=[("grid", str, "", "a sweep file (configs/sweeps/<name>.yaml, a path) or inline knob=[values];..."),
             ("judge", str, "", "judge model alias; default: judge.model")],
    run_name=lambda cfg, args: f"{cfg.model.alias}-sweep-{_grid(args).name}",
    tags=lambda cfg, args: {"sweep.name": _grid(args).name},
)
main = ENTRY.main

if __name__ == "__main__":
    _cli.main(main)
