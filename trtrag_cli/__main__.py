"""python -m trtrag_cli"""

from trtrag_cli.cli.app import main

main()
