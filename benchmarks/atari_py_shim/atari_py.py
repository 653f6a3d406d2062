"""A stand-in for the retired `atari_py` package, so that Kaixhin/Rainbow runs on ale-py.

Kaixhin/Rainbow (env.py, main.py) calls four things of atari_py: `ALEInterface()`, whose methods
(setInt, setFloat, setBool, loadROM, getMinimalActionSet, act, game_over, lives, reset_game,
getScreenGrayscale) ale-py's `ALEInterface` has under the same names; `get_game_path(game)`; and
`list_games()`. Only benchmarks/bench_der_kaixhin.py puts this folder on PYTHONPATH.
"""

from ale_py import ALEInterface, roms  # noqa: F401  (ALEInterface is the one-to-one counterpart)


def get_game_path(game: str) -> str:
    """The ROM file of a game by atari_py's snake_case name (pong, space_invaders)."""
    return str(roms.get_rom_path(game))


def list_games() -> list[str]:
    """The games whose ROMs ale-py bundles, by snake_case name."""
    return sorted(roms.get_all_rom_ids())
