from asyncpp.cli import main

main()
