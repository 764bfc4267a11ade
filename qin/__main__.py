from qin.cli import console_main

console_main()
