from gpuplugin.cli import main

main()
