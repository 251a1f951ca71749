from fastgrpo.tasks.arithmetic.data import main

main()
