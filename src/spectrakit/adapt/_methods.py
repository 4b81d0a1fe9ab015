"""Importing this module registers every adapter method."""

from . import (  # noqa: F401
    asymmetric,
    balora,
    dota,
    eva,
    fourierft,
    hra,
    lora,
    lorma,
    milora,
    pissa,
    qgoft,
    salt,
    sara,
    soda,
    soma,
    sorsa,
    spectral,
    sst,
    svfit,
    svft,
)
