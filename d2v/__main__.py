from d2v.cli import main

main()
