/** @lifeboat/store-azure: public API. */
export {};
