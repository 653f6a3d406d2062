"""the study's grids (TOML) and how their runs are executed"""
