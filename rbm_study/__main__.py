import sys

from rbm_study.cli import main

sys.exit(main())
