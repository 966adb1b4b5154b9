"""s3pet: sparse structure search for parameter-efficient tuning (S3PET, Hu et al. 2022)."""

__version__ = "0.1.0"

from s3pet.errors import S3petError  # noqa: E402,F401
