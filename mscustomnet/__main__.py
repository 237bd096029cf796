from mscustomnet.cli import main

main()
