from dprdm.cli import main

main()
