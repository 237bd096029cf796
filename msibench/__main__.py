from msibench.cli import main

main()
