import sys

from spo_ray.cli import main

sys.exit(main())
