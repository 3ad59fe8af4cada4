"""python -m trtrag_cli"""

from .cli import main

main()
